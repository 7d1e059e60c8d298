"""The self-check's account of the re-rank tier (index/rerank_tier.py): where the tier ranks each true neighbour
among a query's candidates, from one IndexRefine search over them, so every (refine factor, exact factor) is
priced without reading a row (index/selfcheck.py)."""

from __future__ import annotations

import faiss
import numpy as np

from clip_hpc.ann.ground_truth import ABSENT
from clip_hpc.ann.tier import refine_over


def tier_ranks(found: np.ndarray, scores: np.ndarray, positions: np.ndarray, prefixes: list[int]) -> np.ndarray:
    """For each query, true top-k id and candidate prefix length C: how many of the first C candidates the tier
    scores above that id (a large number where the id is not among them). The tier hands its best E to the exact
    re-rank, so the id survives (C, E) when this is below E. `scores[i, j]` is the tier's score of `found[i, j]`."""
    out = np.full((len(prefixes), *positions.shape), ABSENT, dtype=np.int64)
    cols = np.asarray(prefixes) - 1
    for i in range(len(found)):
        present = np.flatnonzero(positions[i] < found.shape[1])
        if not len(present):
            continue
        mine = scores[i, positions[i, present]]
        above = np.cumsum(scores[i][None, :] > mine[:, None], axis=1)[:, np.minimum(cols, found.shape[1] - 1)]
        inside = positions[i, present][:, None] <= cols[None, :]
        out[:, i, present] = np.where(inside, above, out[:, i, present].T).T
    return out


def tier_scores(index: faiss.Index, tier: faiss.Index, queries: np.ndarray, found: np.ndarray) -> np.ndarray:
    """The tier's score of every candidate in `found` (the index's own list at its nprobe; -inf where -1), from
    FAISS's IndexRefine over the same candidates, re-scored and mapped back to their places."""
    refine = refine_over(index, tier)
    got_scores, got_ids = refine.search(
        np.ascontiguousarray(queries, dtype=np.float32),
        found.shape[1],
        params=faiss.IndexRefineSearchParameters(k_factor=1.0),
    )
    out = np.full(found.shape, -np.inf, dtype=np.float32)
    for i in range(len(found)):
        order = np.argsort(got_ids[i], kind="stable")
        ids = got_ids[i][order]
        at = np.minimum(np.searchsorted(ids, found[i]), len(ids) - 1)
        ok = (ids[at] == found[i]) & (found[i] >= 0)
        out[i, ok] = got_scores[i][order][at[ok]]
    return out
