"""The embedding benchmark's split rates (scripts/bench_embed.py, scripts/gpu_check.py): the reader alone and the model
alone, so the bottleneck of an end-to-end run is visible."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from clip_hpc.ingest.sources import list_images


def decode_rate(images: Path, model: str, workers: int, batch: int) -> float:
    """The reader alone: DataLoader workers decode and preprocess, nothing runs the model."""
    from torch.utils.data import DataLoader

    from clip_hpc.ingest.image_dataset import ImageDataset, collate
    from clip_hpc.model.loading import load_model

    loaded = load_model(model, "none", device="cpu")
    paths = list_images([images])
    ds = ImageDataset(range(len(paths)), paths, loaded.preprocess, loaded.image_size, 10**9)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate)
    t0 = time.perf_counter()
    n = sum(len(b["ids"]) for b in loader)
    return n / (time.perf_counter() - t0)


def model_rate(model: str, batch: int, seconds: float = 8.0) -> float:
    """The mapper alone: inference on ready tensors, all cores to one process."""
    from clip_hpc.model.loading import load_model

    loaded = load_model(model, "none", device="auto")
    x = torch.randn(batch, 3, loaded.image_size, loaded.image_size)
    loaded.encode_images(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loaded.encode_images(x)
        n += batch
    return n / (time.perf_counter() - t0)
