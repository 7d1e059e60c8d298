"""Exact neighbours and what counts as finding them: the ground truth of the recall self-check.

Web collections hold exact duplicates by the thousand (placeholder images, re-posts): their vectors are equal,
so which of them the exact top-10 names is an accident of the search order, and counting by ids alone calls an
index that returns other copies wrong (300 equal vectors: recall 0 for an exact index). Recall here counts a
result as found when its exact score reaches the k-th exact score; for the queries with no tie at the k-th place
that is the same as matching ids, and only tied queries pay for reading their candidates' rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

RECALL_K = 10
EXACT_CHUNK = 65_536
ABSENT = np.iinfo(np.int64).max  # the position of an id not among the candidates
TIE_TOLERANCE = 1e-5  # equal float16 rows score within float32 rounding of each other, far below any real gap


def true_neighbours(exact_ids: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """How many of each query's exact top-k exist (-1 marks none): fewer than k when the index holds fewer than k
    vectors, and recall is the share of those found (an exact index of 5 vectors has recall 1, not 0.5)."""
    return np.maximum((np.asarray(exact_ids)[:, :k] >= 0).sum(axis=1), 1)


def recall_per_query(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """For each query, the fraction of the exact top-k (those that exist) found in the approximate top-k."""
    found = [len(set(a[:k].tolist()) & set(e[:k].tolist()) - {-1}) for a, e in zip(approx_ids, exact_ids)]
    return np.asarray(found, dtype=np.float64) / true_neighbours(exact_ids, k) if found else np.zeros(0)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = RECALL_K) -> float:
    per_query = recall_per_query(approx_ids, exact_ids, k)
    return float(per_query.mean()) if len(per_query) else 0.0


def exact_scored(
    queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = EXACT_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k ids and scores over a (memory-mapped) matrix, chunk by chunk through FAISS's
    brute-force knn (7x numpy's argpartition at 1,600 queries); all-zero rows (ids never embedded) never match
    (id -1, score -inf)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32)
        empty = np.asarray(~block.any(axis=1))
        wanted = min(len(block), k + int(empty.sum()))  # enough that dropping the empty rows leaves k
        scores, ids = faiss.knn(queries, block, wanted, metric=faiss.METRIC_INNER_PRODUCT)
        scores[(ids < 0) | empty[np.maximum(ids, 0)]] = -np.inf
        all_s = np.concatenate([best_s, scores], axis=1)
        all_i = np.concatenate([best_i, ids + start], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return np.where(np.isfinite(best_s), best_i, -1), best_s


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = EXACT_CHUNK) -> np.ndarray:
    """The ids of `exact_scored`."""
    return exact_scored(queries, vectors, k, chunk)[0]


@dataclass
class Truth:
    """The exact top-k of a set of queries, and which of them tie at the k-th place (the (k+1)-th scores as
    much): for those, any candidate that scores as much is as right as the id the exact search happened to name."""

    ids: np.ndarray  # (n, k)
    kth: np.ndarray  # (n,) the k-th exact score (-inf where fewer than k exist)
    tied: np.ndarray  # (n,) bool

    def rows(self, at: slice) -> Truth:
        return Truth(self.ids[at], self.kth[at], self.tied[at])


def _own_moved_last(ids: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The column order that moves each row's own id (own[i] >= 0) to the end, and where it now sits."""
    drop = (ids == own[:, None]) & (own[:, None] >= 0)
    order = np.argsort(drop, axis=1, kind="stable")  # the others first, in their order
    return order, np.take_along_axis(drop, order, 1)


def without_own(ids: np.ndarray, own: np.ndarray | None) -> np.ndarray:
    """Each row's own id (own[i] >= 0) taken out, the rest moved up and -1 at the end. An indexed vector asked as a
    query stands for a new image of its kind only when it cannot find itself: its neighbours are the others (the
    self-check once claimed 0.986 for image queries where held-out images got 0.975)."""
    ids = np.asarray(ids)
    if own is None or not (np.asarray(own) >= 0).any():
        return ids
    order, dropped = _own_moved_last(ids, np.asarray(own))
    out = np.take_along_axis(ids, order, 1)
    out[dropped] = -1
    return out


def exact_truth(
    queries: np.ndarray,
    vectors: np.ndarray,
    k: int = RECALL_K,
    chunk: int = EXACT_CHUNK,
    own: np.ndarray | None = None,
) -> Truth:
    """One exact search of k+1 neighbours: the top k, and whether the next one ties with the k-th; rows with an
    `own` id (>= 0) leave it out (`without_own`), their neighbours being the others."""
    mine = own is not None and bool((np.asarray(own) >= 0).any())
    ids, scores = exact_scored(queries, vectors, k + 1 + int(mine), chunk)
    if mine:
        order, dropped = _own_moved_last(ids, np.asarray(own))
        ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        ids[dropped], scores[dropped] = -1, -np.inf
        ids, scores = ids[:, : k + 1], scores[:, : k + 1]
    kth = scores[:, k - 1] if scores.shape[1] >= k else np.full(len(ids), -np.inf, dtype=np.float32)
    tied = (scores.shape[1] > k) & np.isfinite(kth)
    if scores.shape[1] > k:
        tied &= scores[:, k] >= kth - TIE_TOLERANCE
    return Truth(ids[:, :k], kth, np.asarray(tied, dtype=bool))


def hit_positions(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Where each query's exact top-k ids sit in its candidate list (ABSENT where not in it, or -1).
    Re-ranking the first C candidates exactly keeps every true top-k id among them (each outscores every other
    candidate), so that re-rank's recall is mean(positions < C) / k: one search at the largest C prices every
    refine factor, and no vector is read to measure it."""
    found, exact = np.asarray(found), np.asarray(exact)
    positions = np.full(exact.shape, ABSENT, dtype=np.int64)
    for j in range(exact.shape[1]):
        match = (found == exact[:, j : j + 1]) & (exact[:, j : j + 1] >= 0)
        hit = match.any(axis=1)
        positions[hit, j] = match[hit].argmax(axis=1)
    return positions


def tie_aware_positions(found: np.ndarray, truth: Truth, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """`hit_positions`, except that for a query tied at the k-th place the positions are those of the first k
    candidates scoring at least the k-th exact score (rows read only for those queries): an exact re-rank of a
    prefix then returns min(k, their number in it) results as good as the exact ones, so the same count holds."""
    positions = hit_positions(found, truth.ids)
    k = truth.ids.shape[1]
    for q in np.flatnonzero(truth.tied):
        cand = np.asarray(found[q])
        at = np.flatnonzero(cand >= 0)
        order = np.argsort(cand[at], kind="stable")
        scores = np.empty(len(at), dtype=np.float32)
        query = np.asarray(queries[q], dtype=np.float32)
        for lo in range(0, len(at), EXACT_CHUNK):  # rows in id order: a memory map reads forward
            part = order[lo : lo + EXACT_CHUNK]
            scores[part] = np.asarray(vectors[cand[at[part]]], dtype=np.float32) @ query
        good = at[scores >= truth.kth[q] - TIE_TOLERANCE][:k]
        positions[q] = ABSENT
        positions[q, : len(good)] = good
    return positions
