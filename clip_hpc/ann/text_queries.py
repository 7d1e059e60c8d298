"""Text-like queries for the recall self-check: real captions through the index's own text tower when its weights
load, and synthetic ones built the way CLIP text queries sit against image vectors (a constant modality gap).

A real CLIP text query is far from every image: its best image match has a cosine of about 0.25-0.45. The
synthetic ones copy that: q = a·image + 0.9·gap + noise, one fixed gap direction per group, with `a` set so the
query's cosine to its image is the target (0.45 down to 0.25); the image-side offset alone (cosine ~0.7) was too
soft, and the self-check over-claimed recall with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clip_hpc.ann.core import normalise_rows

GAP_WEIGHT = 0.9
TEXT_COSINES = (0.45, 0.40, 0.35, 0.30, 0.25)  # cosine of a query to its own image, strongest gap last
TEXT_NOISES = (0.2, 0.4, 0.6)  # norm of the per-query noise, cycled over the groups
SUBJECTS = (
    "a dog",
    "a cat",
    "a red car",
    "a bicycle",
    "a mountain",
    "a sandy beach",
    "a city street at night",
    "a bowl of soup",
    "a wooden table",
    "an old man",
    "a child playing",
    "a bird on a branch",
    "a sailing boat",
    "a forest path",
    "a bowl of fruit",
    "a laptop on a desk",
    "a train station",
    "a snowy field",
    "a pizza",
    "a guitar",
    "a horse",
    "a butterfly",
    "a stone bridge",
    "a castle",
    "a sunset over the sea",
    "a cup of coffee",
    "a bookshelf",
    "a flower garden",
    "an airplane",
    "a skyscraper",
)
TEMPLATES = (
    "a photo of {}",
    "a close-up photo of {}",
    "a drawing of {}",
    "a blurry photo of {}",
    "{} in the rain",
    "a black and white photo of {}",
    "a painting of {}",
    "{} seen from above",
    "a small picture of {}",
    "{} on a sunny day",
)


def captions() -> list[str]:
    """The built-in generic captions (300), in a fixed order."""
    return [template.format(subject) for template in TEMPLATES for subject in SUBJECTS]


@dataclass
class CaptionQueries:
    """Caption embeddings from the index's own model, or why there are none."""

    vectors: np.ndarray | None
    source: str  # "model/pretrained" or "none"
    reason: str | None = None


def caption_queries(model: str | None, pretrained: str | None, dim: int) -> CaptionQueries:
    """The captions through the text tower of `model`/`pretrained` on the CPU; None and the reason when the
    weights cannot be loaded here (synthetic vectors, no cached weights, another dim)."""
    if not model:
        return CaptionQueries(None, "none", "index.json names no model")
    try:
        from clip_hpc.model.loading import load_model

        loaded = load_model(model, pretrained, device="cpu", precision="fp32")
        vectors = np.asarray(loaded.encode_text(captions()), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any failure to load is recorded, never fatal to the build
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return CaptionQueries(None, "none", f"{model}/{pretrained} not loadable here: {reason}")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        return CaptionQueries(None, "none", f"{model} gives {vectors.shape[-1]}-d text vectors, the index {dim}-d")
    return CaptionQueries(vectors, f"{model}/{pretrained}")


def image_weight(cosine: float, noise: float, gap: float = GAP_WEIGHT) -> float:
    """The image coefficient `a` that puts a·x + gap·g + noise at `cosine` to x (x, g unit and nearly orthogonal)."""
    return cosine * math.sqrt(gap * gap + noise * noise) / math.sqrt(1.0 - cosine * cosine)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_like(
    images: np.ndarray,
    gap_direction: np.ndarray,
    cosine: float,
    noise: float,
    rng: np.random.Generator,
    gap: float = GAP_WEIGHT,
) -> np.ndarray:
    """a·image + gap·direction + noise of norm `noise`, normalised; `a` from `image_weight`."""
    images = _unit(images)
    a = image_weight(cosine, noise, gap)
    jitter = rng.standard_normal(images.shape).astype(np.float32) * (noise / math.sqrt(images.shape[1]))
    return _unit(a * images + gap * _unit(gap_direction)[None, :] + jitter)


def text_like_groups(
    images: np.ndarray,
    rng: np.random.Generator,
    groups: int = 10,
    cosines: tuple[float, ...] = TEXT_COSINES,
    noises: tuple[float, ...] = TEXT_NOISES,
) -> list[tuple[float, np.ndarray]]:
    """The images cut into `groups`, each with its own random gap direction; cosines and noises cycled.
    Returns (target cosine, queries) per group."""
    out: list[tuple[float, np.ndarray]] = []
    for i, part in enumerate(np.array_split(np.asarray(images, dtype=np.float32), max(1, min(groups, len(images))))):
        direction = rng.standard_normal((images.shape[1],))
        cosine = cosines[i % len(cosines)]
        out.append((cosine, text_like(part, direction, cosine, noises[i % len(noises)], rng)))
    return out


OFF_DIRECTIONS = 8  # offset directions in the off-distribution set, one group of queries each
OFF_NOISES = (0.2, 0.3, 0.5)  # per-query noise, cycled over the groups


def off_distribution_queries(
    queries: np.ndarray, rng: np.random.Generator, offset_norm: float = 1.0, noise: float = 0.3
) -> np.ndarray:
    """A stand-in for text queries against image vectors: one constant offset (the "modality gap") plus noise."""
    dim = queries.shape[1]
    offset = normalise_rows(rng.standard_normal((dim,)))[None, :] * offset_norm
    jitter = rng.standard_normal(queries.shape).astype(np.float32) * (noise / math.sqrt(dim))
    return normalise_rows(queries + offset + jitter)


def off_distribution_groups(
    queries: np.ndarray, rng: np.random.Generator, directions: int = OFF_DIRECTIONS
) -> list[np.ndarray]:
    """The queries cut into `directions` groups, each shifted by its own random offset, with noise levels cycled."""
    groups = np.array_split(np.asarray(queries, dtype=np.float32), max(1, min(directions, len(queries))))
    return [off_distribution_queries(g, rng, noise=OFF_NOISES[i % len(OFF_NOISES)]) for i, g in enumerate(groups)]
