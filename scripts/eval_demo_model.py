#!/usr/bin/env python
"""Held-out text-to-image retrieval of `clip-hpc-demo`: R@1, R@5, R@10 for colour-and-shape queries.

Queries are "a {colour} {shape}" in three templates (every colour-shape pair, 120 queries); an image is relevant
when it shows that colour and that shape, whatever its count, size, position or background. The evaluation lives
in clip_hpc.devdata.demo_model. Prints JSON, then a table.

    python scripts/eval_demo_model.py                 # the shipped checkpoint, 1,000 held-out images
    python scripts/eval_demo_model.py --pretrained /tmp/demo.safetensors -n 200 --image-size 128
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from clip_hpc.devdata import captioned_shapes as cs
from clip_hpc.devdata.demo_model import evaluate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", default=None, help="checkpoint; default: the one shipped in the package")
    ap.add_argument("-n", type=int, default=cs.HELDOUT_SIZE, help="held-out images (the split's first n)")
    ap.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=[64, 128],
        help="render sizes to evaluate (the demo writes 128 px images; the model sees 64 px)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = [evaluate(args.pretrained, args.n, size) for size in args.image_size]
    print(json.dumps(rows, indent=2))
    print("\n| images | rendered at | queries | R@1 | R@5 | R@10 | P@10 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['images']} | {r['image_size']} px | {r['queries']} | {r['R@1']:.3f} | {r['R@5']:.3f} "
            f"| {r['R@10']:.3f} | {r['P@10']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
