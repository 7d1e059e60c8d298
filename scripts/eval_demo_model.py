#!/usr/bin/env python
"""Held-out text-to-image retrieval of `clip-hpc-demo`: R@1, R@5, R@10 for colour-and-shape queries.

Queries are "a {colour} {shape}" in three templates (every colour-shape pair, 120 queries); an image is relevant
when it shows that colour and that shape, whatever its count, size, position or background. Images go through the
model's own inference preprocess, as `clip-hpc embed` does. Prints JSON, then a table.

    python scripts/eval_demo_model.py                 # the shipped checkpoint, 1,000 held-out images
    python scripts/eval_demo_model.py --pretrained /tmp/demo.safetensors -n 200 --image-size 128
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_hpc import captioned_shapes as cs  # noqa: E402
from clip_hpc.models import LoadedModel, load_model  # noqa: E402


def embed_pixels(model: LoadedModel, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 [n, H, W, 3] through the inference preprocess (PIL in, tensor out) and the image tower."""
    out = []
    for i in range(0, len(pixels), batch_size):
        batch = torch.stack([model.preprocess(Image.fromarray(p)) for p in pixels[i:i + batch_size]])
        out.append(model.encode_images(batch))
    return np.concatenate(out)


def rank(text_emb: np.ndarray, image_emb: np.ndarray, k: int) -> np.ndarray:
    """Exact search: the rows of the k best images per query, best first."""
    scores = text_emb @ image_emb.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def evaluate(pretrained: str | None = None, n: int = cs.HELDOUT_SIZE, image_size: int = 64) -> dict:
    """Metrics of the model on the first n held-out images rendered at image_size pixels."""
    model = load_model("clip-hpc-demo", pretrained, device="cpu")
    pixels, _, attrs = cs.make_dataset(cs.HELDOUT_SEED, n, image_size)
    queries = cs.colour_shape_queries()
    ranked = rank(model.encode_text([q for q, _, _ in queries]), embed_pixels(model, pixels), 10)
    metrics = cs.retrieval_metrics(ranked, cs.colour_shape_relevance(queries, attrs))
    return {"images": n, "image_size": image_size, "queries": len(queries),
            **{k: round(v, 4) for k, v in metrics.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", default=None, help="checkpoint; default: the one shipped in the package")
    ap.add_argument("-n", type=int, default=cs.HELDOUT_SIZE, help="held-out images (the split's first n)")
    ap.add_argument("--image-size", type=int, nargs="+", default=[64, 128],
                    help="render sizes to evaluate (the demo writes 128 px images; the model sees 64 px)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = [evaluate(args.pretrained, args.n, size) for size in args.image_size]
    print(json.dumps(rows, indent=2))
    print("\n| images | rendered at | queries | R@1 | R@5 | R@10 | P@10 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['image_size']} px | {r['queries']} | {r['R@1']:.3f} | {r['R@5']:.3f} "
              f"| {r['R@10']:.3f} | {r['P@10']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
