"""Training and evaluating `clip-hpc-demo`, the small CLIP that ships with the package, on synthetic captioned
shapes. The recipe lives here, not in scripts/, because the tests check that it is reproducible and that the shipped
weights pass the held-out bar; scripts/train_demo_model.py and scripts/eval_demo_model.py are its command lines.

Training is CPU only, seeded, a fixed number of steps (not wall time), so the same seed and thread count give the
same checkpoint bytes: the fp16 state_dict in safetensors, loaded by `load_model("clip-hpc-demo")`. Evaluation is
held-out text-to-image retrieval (R@1, R@5, R@10) for colour-and-shape queries, through the model's own inference
preprocess, as `clip-hpc embed` does.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
from PIL import Image

from clip_hpc.devdata import captioned_shapes as cs
from clip_hpc.model.loading import WEIGHTS_DIR, LoadedModel, load_model, register_model_configs, seeded
from clip_hpc.model.open_clip_types import OpenClipModel

MODEL_NAME = "clip-hpc-demo"
DEFAULT_OUT = WEIGHTS_DIR / f"{MODEL_NAME}.safetensors"


def build_model(seed: int) -> OpenClipModel:
    import open_clip

    register_model_configs()
    with seeded(seed):
        return open_clip.create_model(MODEL_NAME, pretrained=None, output_dict=True)


def make_training_data(n: int, n_captions: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels [n, 3, H, W] and tokens [n, n_captions, context]: each image keeps several paraphrases."""
    import open_clip

    pixels, captions, _ = cs.make_dataset(cs.TRAIN_SEED, n, image_size, n_captions)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    flat = [c for caps in captions for c in caps]
    tokens = torch.cat([tokenizer(flat[i : i + 4096]) for i in range(0, len(flat), 4096)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), tokens.view(n, n_captions, -1)


class Normaliser:
    """uint8 batches to the model's input, with the same mean and std as the inference preprocess."""

    def __init__(self, model: OpenClipModel):
        cfg = model.visual.preprocess_cfg
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.mean) / self.std


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(
    steps: int, batch_size: int, train_size: int, lr: float, seed: int, n_captions: int = 4, log_every: int = 50
) -> tuple[OpenClipModel, dict]:
    """The whole recipe; returns the model (fp32, train mode off) and a log of losses and timings."""
    from open_clip.loss import ClipLoss

    t0 = time.perf_counter()
    model = build_model(seed)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    pixels, tokens = make_training_data(train_size, n_captions, image_size)
    t_data = time.perf_counter() - t0
    normalise, loss_fn = Normaliser(model), ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    model.train()
    losses, order, pos = [], torch.randperm(train_size, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > train_size:
            order, pos = torch.randperm(train_size, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        which = torch.randint(n_captions, (len(idx),), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        out = model(normalise(pixels[idx]), tokens[idx, which])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:5d}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                f"scale {model.logit_scale.exp().item():.1f} {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    model.eval()
    log = {
        "steps": steps,
        "batch_size": batch_size,
        "train_size": train_size,
        "lr": lr,
        "seed": seed,
        "n_captions": n_captions,
        "threads": torch.get_num_threads(),
        "data_s": round(t_data, 1),
        "train_s": round(time.perf_counter() - t0 - t_data, 1),
        "final_loss": float(np.mean(losses[-50:])),
    }
    return model, log


def checkpoint_bytes(model: OpenClipModel, recipe: dict) -> bytes:
    """fp16 weights (half the size; the fp32 model reloads them exactly) plus the recipe as metadata."""
    from safetensors.torch import save

    state = {k: (v.half() if v.is_floating_point() else v).detach().contiguous() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes several in hash order, which would break byte-for-byte reproducibility
    return save(state, metadata={"clip_hpc": json.dumps({"model": MODEL_NAME, **recipe}, sort_keys=True)})


# --- evaluation -----------------------------------------------------------------------------------------------
def embed_pixels(model: LoadedModel, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 [n, H, W, 3] through the inference preprocess (PIL in, tensor out) and the image tower."""
    out = []
    for i in range(0, len(pixels), batch_size):
        batch = torch.stack([model.preprocess(Image.fromarray(p)) for p in pixels[i : i + batch_size]])
        out.append(model.encode_images(batch))
    return np.concatenate(out)


def rank(text_emb: np.ndarray, image_emb: np.ndarray, k: int) -> np.ndarray:
    """Exact search: the rows of the k best images per query, best first."""
    scores = text_emb @ image_emb.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def evaluate(pretrained: str | None = None, n: int = cs.HELDOUT_SIZE, image_size: int = 64) -> dict:
    """Metrics of the model on the first n held-out images rendered at image_size pixels."""
    model = load_model(MODEL_NAME, pretrained, device="cpu")
    pixels, _, attrs = cs.make_dataset(cs.HELDOUT_SEED, n, image_size)
    queries = cs.colour_shape_queries()
    ranked = rank(model.encode_text([q for q, _, _ in queries]), embed_pixels(model, pixels), 10)
    metrics = cs.retrieval_metrics(ranked, cs.colour_shape_relevance(queries, attrs))
    return {
        "images": n,
        "image_size": image_size,
        "queries": len(queries),
        **{k: round(v, 4) for k, v in metrics.items()},
    }
