"""The rule that keeps an image, as pure functions (numpy in, numpy out): an image's score is its best cosine to
any positive query; it is kept when the score reaches the threshold and beats its best cosine to every negative.

Vectors are stored as float16 and scored in float32; `score_rows` takes a torch device so a GPU does the products
when there is one, with the same arithmetic (float32 products of the float16 values) as the numpy path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from clip_hpc.formats.span_read import room_for

if TYPE_CHECKING:
    import torch

CPU_BLOCK_ROWS = 1024  # float32 rows converted at a time on a CPU (2 MiB): the best of 256-4,096 measured on a 1 MiB L2
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
    for the CPU. torch does the products on both (numpy's float16 conversion is several times slower), a block at a
    time: each block's maxima are taken while its products are still in cache, so no (rows, queries) array is kept."""
    import torch

    queries = torch.from_numpy(np.concatenate([positives, negatives]).astype(np.float32))
    rows = torch.from_numpy(np.ascontiguousarray(embeddings))
    n, n_pos = len(rows), len(positives)
    score, query = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.int64)
    negative = torch.full((n,), -np.inf, dtype=torch.float32)
    on_device = device is not None and device != "cpu"
    step = GPU_BLOCK_ROWS if on_device else CPU_BLOCK_ROWS
    products = _block_products(rows, queries.to(device) if on_device else queries, step, device if on_device else None)
    for lo, block in products:
        at = slice(lo, lo + len(block))
        best = block[:, :n_pos].max(dim=1)
        score[at], query[at] = best.values.cpu(), best.indices.cpu()
        if len(negatives):
            negative[at] = block[:, n_pos:].max(dim=1).values.cpu()
    return Scored(score.numpy(), query.numpy().astype(np.int32), negative.numpy())


def pinned_buffers(nbytes: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Two host buffers in page-locked memory, each with room to read `nbytes` of float16 vectors into
    (`span_read.scratch`), for a GPU scan: the device copies a pinned block by DMA, where a pageable one goes through
    a staging copy on the CPU first. None without CUDA."""
    import torch

    try:
        first, second = (torch.empty(room_for(nbytes), dtype=torch.uint8, pin_memory=True) for _ in range(2))
    except RuntimeError:  # no CUDA driver or device: page-locked memory is a CUDA allocation
        return None
    return first.numpy(), second.numpy()  # each array keeps its tensor, and so the pinned memory, alive


def _block_products(
    rows: torch.Tensor, queries: torch.Tensor, step: int, device: str | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, the block's (rows, queries) float32 products), block by block. On a CPU every block is converted
    into one reused float32 buffer and multiplied into one reused product buffer: nothing is allocated per block."""
    import torch

    if device is not None:
        for lo in range(0, len(rows), step):
            yield lo, rows[lo : lo + step].to(device, non_blocking=True).float() @ queries.T
        return
    transposed = queries.T.contiguous()  # (dim, queries): the faster kernel for thin products
    converted = torch.empty((min(step, len(rows)), rows.shape[1] if rows.ndim == 2 else 0), dtype=torch.float32)
    products = torch.empty((len(converted), len(queries)), dtype=torch.float32)
    for lo in range(0, len(rows), step):
        block = rows[lo : lo + step]
        converted[: len(block)].copy_(block)
        torch.mm(converted[: len(block)], transposed, out=products[: len(block)])
        yield lo, products[: len(block)]


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


def no_direction(embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pure: which of `rows` hold no usable direction (not finite, or not unit length: a zero vector has no cosine,
    yet scores 0 and would pass a threshold <= 0 or fill a --top); the index build's own check, row by row."""
    from clip_hpc.formats.shard import not_unit_rows

    return not_unit_rows(embeddings[rows])


def best_first(scores: np.ndarray, ids: np.ndarray, n: int | None = None) -> np.ndarray:
    """Positions of the `n` best rows (all when None), best first; equal scores go to the lower id."""
    order = np.lexsort((ids, -np.asarray(scores, np.float64)))
    return order if n is None else order[:n]
