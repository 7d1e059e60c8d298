"""The rule that keeps an image, as pure functions (numpy in, numpy out): an image's score is its best cosine to
any positive query; it is kept when the score reaches the threshold and beats its best cosine to every negative.

Vectors are stored as float16 and scored in float32; `score_rows` takes a torch device so a GPU does the products
when there is one, with the same arithmetic (float32 products of the float16 values) as the numpy path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CPU_BLOCK_ROWS = 2048  # float32 rows converted at a time on a CPU: 4 MiB, so conversion and products stay in cache
GPU_BLOCK_ROWS = 1 << 16


class Scored(NamedTuple):
    """Per row: the best positive cosine, which positive gave it, and the best negative cosine (-inf: none)."""

    score: np.ndarray  # float32
    query: np.ndarray  # int32
    negative: np.ndarray  # float32


def score_rows(
    embeddings: np.ndarray, positives: np.ndarray, negatives: np.ndarray, device: str | None = None
) -> Scored:
    """Every row of `embeddings` against all queries at once; `device` a torch device name ("cuda:0"), or None
    for the CPU. torch does the products on both (numpy's float16 conversion is several times slower)."""
    products = query_products(embeddings, np.concatenate([positives, negatives]).astype(np.float32), device)
    n_pos = len(positives)
    negative = products[:, n_pos:].max(axis=1) if len(negatives) else np.full(len(products), -np.inf, np.float32)
    return Scored(products[:, :n_pos].max(axis=1), products[:, :n_pos].argmax(axis=1).astype(np.int32), negative)


def query_products(embeddings: np.ndarray, queries: np.ndarray, device: str | None = None) -> np.ndarray:
    """(n, queries) float32 cosines: stored rows converted to float32 a block at a time into one reused buffer."""
    import torch

    rows = torch.from_numpy(np.ascontiguousarray(embeddings))
    out = torch.empty((len(embeddings), len(queries)), dtype=torch.float32)
    if device is not None and device != "cpu":
        on_device = torch.from_numpy(queries).to(device)
        for lo in range(0, len(rows), GPU_BLOCK_ROWS):
            block = rows[lo : lo + GPU_BLOCK_ROWS].to(device, non_blocking=True).float()
            out[lo : lo + len(block)] = (block @ on_device.T).cpu()
        return out.numpy()
    transposed = torch.from_numpy(queries).T.contiguous()  # (dim, queries): the faster kernel for thin products
    buffer = torch.empty((CPU_BLOCK_ROWS, embeddings.shape[1] if embeddings.ndim == 2 else 0), dtype=torch.float32)
    for lo in range(0, len(rows), CPU_BLOCK_ROWS):
        block = rows[lo : lo + CPU_BLOCK_ROWS]
        converted = buffer[: len(block)]
        converted.copy_(block)
        torch.matmul(converted, transposed, out=out[lo : lo + len(block)])
    return out.numpy()


def kept(
    scored: Scored,
    threshold: float | None,
    similarity: np.ndarray | None = None,
    min_caption_similarity: float | None = None,
) -> np.ndarray:
    """Which rows pass: score >= threshold (no threshold: any), above their best negative, and (when asked) an
    image-caption similarity >= the minimum (a row without a caption, NaN, never passes)."""
    keep = scored.score > scored.negative
    if threshold is not None:
        keep &= scored.score >= np.float32(threshold)
    if min_caption_similarity is not None:
        if similarity is None:
            return np.zeros(len(keep), bool)
        with np.errstate(invalid="ignore"):
            keep &= np.asarray(similarity, np.float32) >= np.float32(min_caption_similarity)
    return keep


def best_first(scores: np.ndarray, ids: np.ndarray, n: int | None = None) -> np.ndarray:
    """Positions of the `n` best rows (all when None), best first; equal scores go to the lower id."""
    order = np.lexsort((ids, -np.asarray(scores, np.float64)))
    return order if n is None else order[:n]
