"""Synthetic vectors with planted near-duplicates, for `clip-hpc dedup`'s tests and benchmark.

Clustered CLIP-like vectors (`synthetic_vectors.gaussian_mixture`) of which a fraction gets copies: a copy is its
source plus a random perturbation, renormalised, so its cosine to the source spreads over [`min_cos`, ~1]. Some copies
copy a copy, so groups are chains, not only stars. Rows are shuffled, so copies do not sit beside their sources.
"""

from __future__ import annotations

import numpy as np

from clip_hpc.devdata.synthetic_vectors import gaussian_mixture


def perturbed(sources: np.ndarray, cosines: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly `cosines` from the unit `sources`, in a random direction orthogonal to each."""
    noise = rng.standard_normal(sources.shape).astype(np.float32)
    noise -= np.sum(noise * sources, axis=1, keepdims=True) * sources
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    c = cosines[:, None].astype(np.float32)
    return c * sources + np.sqrt(1 - c * c) * noise


def with_near_duplicates(
    n: int, dim: int, *, fraction: float = 0.05, min_cos: float = 0.9, clusters: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors (float32) and cluster labels, of which `fraction` are planted copies (half of them copies of
    copies)."""
    rng = np.random.default_rng(seed)
    n_copies = int(n * fraction)
    vectors, labels = gaussian_mixture(n - n_copies, dim, clusters=clusters, seed=seed)
    first = n_copies - n_copies // 2
    sources = rng.choice(len(vectors), first, replace=False)
    copies = perturbed(vectors[sources], rng.uniform(min_cos, 1.0, first), rng)
    second = rng.choice(first, n_copies - first, replace=True)  # copies of the copies
    copies = np.concatenate([copies, perturbed(copies[second], rng.uniform(min_cos, 1.0, len(second)), rng)])
    labels = np.concatenate([labels, labels[sources], labels[sources][second]])
    vectors = np.concatenate([vectors, copies])
    order = rng.permutation(n)
    return vectors[order], labels[order]
