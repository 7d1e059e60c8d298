"""The rule that keeps an image, as pure functions (numpy in, numpy out): an image's score is its best cosine to
any positive query; it is kept when the score reaches the threshold and beats its best cosine to every negative.

Vectors are stored as float16 and scored in float32; `score_rows` takes a torch device so a GPU does the products
when there is one, with the same arithmetic (float32 products of the float16 values) as the numpy path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

BLOCK_ROWS = 1 << 16  # rows converted to float32 at a time: bounded memory for any shard size


class Scored(NamedTuple):
    """Per row: the best positive cosine, which positive gave it, and the best negative cosine (-inf: none)."""

    score: np.ndarray  # float32
    query: np.ndarray  # int32
    negative: np.ndarray  # float32


def score_rows(embeddings: np.ndarray, positives: np.ndarray, negatives: np.ndarray, device: object = None) -> Scored:
    """Every row of `embeddings` against all queries at once; `device` a torch device (None: numpy on the CPU)."""
    queries = np.concatenate([positives, negatives]).astype(np.float32)
    n, n_pos = len(embeddings), len(positives)
    out = Scored(np.empty(n, np.float32), np.empty(n, np.int32), np.full(n, -np.inf, np.float32))
    for lo in range(0, n, BLOCK_ROWS):
        products = _products(embeddings[lo : lo + BLOCK_ROWS], queries, device)
        out.query[lo : lo + len(products)] = products[:, :n_pos].argmax(axis=1)
        out.score[lo : lo + len(products)] = products[:, :n_pos].max(axis=1)
        if len(negatives):
            out.negative[lo : lo + len(products)] = products[:, n_pos:].max(axis=1)
    return out


def _products(block: np.ndarray, queries: np.ndarray, device: object) -> np.ndarray:
    """float32 cosines of one block of stored rows with every query."""
    if device is None:
        return block.astype(np.float32) @ queries.T
    import torch

    rows = torch.from_numpy(np.ascontiguousarray(block)).to(device).float()
    return (rows @ torch.from_numpy(queries).to(device).T).cpu().numpy()


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
