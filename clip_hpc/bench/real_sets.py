"""Real embedding sets for the index benchmark (scripts/bench_index.py --real DIR), kept outside the project.

A set is a folder: images.npy (N x d image embeddings), and optionally texts.npy (M x d caption embeddings of the
same model) with pairs.npy (M image rows, the image each caption describes; without it text i describes image i).
The split holds out a seeded part of the images (never indexed) and of the captions, so that neither the build's
self-check nor any tuning sees the queries it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_hpc.ann.core import normalise_rows
from clip_hpc.ann.text_queries import text_like
from clip_hpc.errors import UserError

SPLIT_SALT = 0x5EA1  # the held-out draw's own stream: no build seed or self-check stream uses it
STATS_SAMPLE = 2000  # rows drawn for the mean pairwise cosine


@dataclass(frozen=True)
class VectorStats:
    """What says a set looks like CLIP output: norms before normalising, and the mean pairwise cosine."""

    n: int
    dim: int
    norm_min: float
    norm_mean: float
    norm_max: float
    mean_pairwise_cosine: float


@dataclass(frozen=True)
class RealSet:
    """Unit-norm image embeddings, and caption embeddings with the image row each describes (or none); the stats
    are of the files as stored, before normalising."""

    images: np.ndarray
    texts: np.ndarray | None
    pairs: np.ndarray | None
    image_stats: VectorStats
    text_stats: VectorStats | None


@dataclass(frozen=True)
class HeldOutSplit:
    """What is indexed (`base`, rows of the set's images in `base_rows`), and the queries no build sees:
    held-out images, and captions whose own image is indexed (`text_targets`: its row in `base`)."""

    base: np.ndarray
    base_rows: np.ndarray
    image_queries: np.ndarray
    text_queries: np.ndarray
    text_targets: np.ndarray
    text_source: str  # "captions" (real pairs) or "synthetic text-like" (clip_hpc.ann.text_queries)


def _load_matrix(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{path}: expected a 2-D array of embeddings, found shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{path}: expected floating-point embeddings, found {array.dtype}")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise UserError(f"{path}: holds NaN or infinite values")
    return array


def _load_pairs(folder: Path, n_texts: int, n_images: int) -> np.ndarray:
    """pairs.npy, or text i -> image i when there is none (then the counts must match)."""
    path = folder / "pairs.npy"
    if not path.exists():
        if n_texts != n_images:
            raise UserError(f"{folder}: {n_texts} texts and {n_images} images, and no pairs.npy to match them")
        return np.arange(n_texts, dtype=np.int64)
    pairs = np.load(path, allow_pickle=False)
    if pairs.shape != (n_texts,) or not np.issubdtype(pairs.dtype, np.integer):
        raise UserError(f"{path}: expected {n_texts} integer image rows, found {pairs.dtype} {pairs.shape}")
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n_images):
        raise UserError(f"{path}: image rows must lie in [0, {n_images})")
    return pairs.astype(np.int64)


def load_real_set(folder: str | Path) -> RealSet:
    """A set folder (see the module docstring), rows normalised: the index serves cosine similarity."""
    folder = Path(folder)
    if not (folder / "images.npy").is_file():
        raise UserError(f"{folder}: no images.npy (a --real set is a folder with images.npy, texts.npy, pairs.npy)")
    images = _load_matrix(folder / "images.npy")
    if not (folder / "texts.npy").is_file():
        return RealSet(normalise_rows(images), None, None, vector_stats(images), None)
    texts = _load_matrix(folder / "texts.npy")
    if texts.shape[1] != images.shape[1]:
        raise UserError(f"{folder}: texts are {texts.shape[1]}-d, images {images.shape[1]}-d")
    pairs = _load_pairs(folder, len(texts), len(images))
    return RealSet(normalise_rows(images), normalise_rows(texts), pairs, vector_stats(images), vector_stats(texts))


def vector_stats(vectors: np.ndarray, seed: int = 0) -> VectorStats:
    """Norms and the mean cosine between distinct rows of a sample (CLIP images of one model: about 0.4-0.6)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    rng = np.random.default_rng(seed)
    sample = normalise_rows(vectors[rng.choice(len(vectors), size=min(STATS_SAMPLE, len(vectors)), replace=False)])
    gram = sample @ sample.T
    m = len(sample)
    mean_cos = float((gram.sum() - np.trace(gram)) / max(1, m * (m - 1)))
    return VectorStats(
        n=len(vectors),
        dim=vectors.shape[1],
        norm_min=round(float(norms.min()), 4),
        norm_mean=round(float(norms.mean()), 4),
        norm_max=round(float(norms.max()), 4),
        mean_pairwise_cosine=round(mean_cos, 4),
    )


def split_held_out(real: RealSet, n_image_queries: int, n_text_queries: int, seed: int = 0) -> HeldOutSplit:
    """Hold out `n_image_queries` images (never indexed) and up to `n_text_queries` captions of indexed images;
    a set without captions gets synthetic text-like queries over indexed images instead."""
    n = len(real.images)
    if not 0 < n_image_queries < n // 2:
        raise UserError(f"--real: {n_image_queries} image queries out of {n} images; use fewer than half")
    rng = np.random.default_rng([seed, SPLIT_SALT])
    held = np.zeros(n, dtype=bool)
    held[rng.choice(n, size=n_image_queries, replace=False)] = True
    base_rows = np.flatnonzero(~held)
    position = np.full(n, -1, dtype=np.int64)
    position[base_rows] = np.arange(len(base_rows))
    base = real.images[base_rows]
    if real.texts is not None and real.pairs is not None:
        usable = np.flatnonzero(~held[real.pairs])
        picks = np.sort(rng.choice(usable, size=min(n_text_queries, len(usable)), replace=False))
        return HeldOutSplit(
            base, base_rows, real.images[held], real.texts[picks], position[real.pairs[picks]], "captions"
        )
    targets = np.sort(rng.choice(len(base), size=min(n_text_queries, len(base)), replace=False))
    return HeldOutSplit(
        base, base_rows, real.images[held], synthetic_text_like(base[targets], rng), targets, "synthetic text-like"
    )


def synthetic_text_like(images: np.ndarray, rng: np.random.Generator, groups: int = 8) -> np.ndarray:
    """The project's text-like construction (a gap direction per group, cosine 0.25-0.45 to the image): the
    fallback for a set that ships no captions."""
    parts = []
    for part in np.array_split(images, max(1, min(groups, len(images)))):
        direction = rng.standard_normal((images.shape[1],))
        parts.append(text_like(part, direction, float(rng.uniform(0.25, 0.45)), float(rng.uniform(0.1, 0.7)), rng))
    return np.concatenate(parts).astype(np.float32)
