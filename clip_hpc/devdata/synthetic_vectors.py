"""Synthetic CLIP-like vectors as an EMB_DIR, for index tests and benchmarks without embedding millions of images.

A normalised Gaussian mixture: cluster centres on the sphere, each point its centre plus a low-rank Gaussian
(a shared 32-d latent subspace, as real embeddings have low intrinsic dimension) plus a little isotropic noise.
Purely isotropic clusters would make every neighbour equidistant, a case no real data set looks like.

The command line is scripts/make_synthetic_vectors.py; the index tests and benchmarks import it from here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.shard import ShardBatch

MODEL = "synthetic-mixture"


def gaussian_mixture(
    n: int,
    dim: int,
    clusters: int = 1000,
    latent: int = 32,
    spread: float = 0.7,
    noise: float = 0.2,
    seed: int = 0,
    chunk: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors and their cluster labels; generated in chunks to keep peak memory low."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].astype(np.float32)
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        lab = labels[start : start + chunk]
        x = centres[lab]
        x += (spread / np.sqrt(latent)) * (rng.standard_normal((len(lab), latent)).astype(np.float32) @ basis.T)
        x += (noise / np.sqrt(dim)) * rng.standard_normal((len(lab), dim)).astype(np.float32)
        out[start : start + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, labels


def synthetic_path(i: int, label: int) -> str:
    return f"synthetic/c{label:05d}/{i:09d}.jpg"


def write_emb_dir(
    out: Path,
    vectors: np.ndarray,
    labels: np.ndarray,
    shard_size: int,
    *,
    first_id: int = 0,
    model: str = MODEL,
    pretrained: str = "none",
    failed_every: int = 0,
) -> Path:
    """Shards in the `clip-hpc embed` format plus inputs.txt; every `failed_every`-th id is recorded as failed."""
    emb = EmbDir(out)
    n, dim = vectors.shape
    paths = [synthetic_path(first_id + i, int(labels[i])) for i in range(n)]
    old = emb.read_inputs() if first_id else []
    emb.write_inputs(old + paths)
    for start in range(0, n, shard_size):
        ids = np.arange(first_id + start, first_id + min(n, start + shard_size))
        ok = np.ones(len(ids), dtype=bool) if not failed_every else (ids % failed_every != failed_every - 1)
        local = ids - first_id
        emb.write_shard(
            int(ids[0]) // shard_size,
            ShardBatch(
                embeddings=vectors[local[ok]].astype(np.float16),
                ids=ids[ok],
                paths=[paths[i] for i in local[ok]],
                failed_ids=ids[~ok],
                failed_paths=[paths[i] for i in local[~ok]],
                failed_reasons=["synthetic failure"] * int((~ok).sum()),
                attrs={
                    "model": model,
                    "pretrained": pretrained,
                    "dim": dim,
                    "unit": int(ids[0]) // shard_size,
                    "unit_size": shard_size,
                },
            ),
        )
    return out
