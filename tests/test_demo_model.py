"""The shipped demo model: loads by name with no --pretrained, retrieves held-out shapes by colour and shape,
and its training recipe is reproducible (checked on a few steps; the full run is not repeated here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clip_hpc.devdata.demo_model import checkpoint_bytes, evaluate, train
from clip_hpc.model.loading import WEIGHTS_DIR, load_model

SHIPPED = WEIGHTS_DIR / "clip-hpc-demo.safetensors"
# Measured for the shipped model on the first 200 held-out images (scripts/eval_demo_model.py -n 200): R@1 0.975,
# R@10 1.000; random weights: R@1 0.017, R@10 0.258; a 300-step model: R@1 0.17, R@10 0.94. R@10 is the issue's
# figure; R@1 is the one that tells a trained model from an under-trained one. Both bars leave room for rounding.
MIN_HELDOUT_R10 = 0.9
MIN_HELDOUT_R1 = 0.8


def test_shipped_checkpoint_is_small_and_loads_by_name():
    assert SHIPPED.is_file() and SHIPPED.stat().st_size <= 20 * 2**20
    model = load_model("clip-hpc-demo", device="cpu")
    assert Path(model.pretrained) == SHIPPED
    assert (model.dim, model.image_size) == (128, 64)
    emb = model.encode_text(["a red circle", "two yellow squares"])
    assert emb.shape == (2, 128) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_shipped_model_finds_heldout_shapes_by_colour_and_shape():
    metrics = evaluate(None, n=200)
    assert metrics["queries"] == 120
    assert metrics["R@10"] >= MIN_HELDOUT_R10 and metrics["R@1"] >= MIN_HELDOUT_R1, metrics


def test_random_weights_do_not_pass_the_same_bar():
    """The bar must be able to fail: the same architecture untrained is far below it."""
    metrics = evaluate("none", n=200)
    assert metrics["R@10"] < MIN_HELDOUT_R10 and metrics["R@1"] < MIN_HELDOUT_R1, metrics


def _short_run(seed: int) -> tuple[torch.nn.Module, bytes]:
    model, log = train(steps=3, batch_size=32, train_size=128, lr=1e-3, seed=seed, log_every=0)
    return model, checkpoint_bytes(model, {k: log[k] for k in ("steps", "seed")})


def test_training_is_reproducible_and_load_model_reads_what_it_saved(tmp_path):
    model, first = _short_run(seed=5)
    _, second = _short_run(seed=5)
    _, other_seed = _short_run(seed=6)
    assert first == second
    assert first != other_seed
    path = tmp_path / "demo.safetensors"
    path.write_bytes(first)
    loaded = load_model("clip-hpc-demo", str(path), device="cpu")
    texts = ["a red circle", "three small blue stars on a striped white background"]
    with torch.no_grad():
        expected = model.half().float().encode_text(loaded.tokenizer(texts), normalize=True).numpy()
    assert np.allclose(loaded.encode_text(texts), expected, atol=1e-5)
