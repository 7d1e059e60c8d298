"""Helpers shared by the index and search tests: synthetic EMB_DIRs in the real shard format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip_hpc.devdata import synthetic_vectors as synthetic


def synthetic_emb_dir(
    out: Path, n: int, dim: int = 32, *, shard_size: int = 500, seed: int = 0, clusters: int = 20, failed_every: int = 0
) -> tuple[Path, np.ndarray]:
    """An EMB_DIR of `n` mixture vectors; returns it and the float16-rounded vectors as written."""
    vectors, labels = synthetic.gaussian_mixture(n, dim, clusters, latent=min(8, dim), seed=seed)
    synthetic.write_emb_dir(out, vectors, labels, shard_size, failed_every=failed_every)
    return out, vectors.astype(np.float16).astype(np.float32)
