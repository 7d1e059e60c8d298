"""The recall self-check of an index: recall@10 of the served configuration against exact inner-product search,
for indexed vectors used as queries and for off-distribution ones (a stand-in for text queries, which sit apart
from image vectors: CLIP's "modality gap"), and the nprobe / refine-factor tuning built on it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import faiss
import numpy as np

from clip_hpc.search import normalise_rows, search_index, set_nprobe

TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_QUERIES = 400
REFINE_FACTORS = (10, 25, 50, 100)  # candidates per result re-ranked exactly; grown only when needed
EXACT_CHUNK = 65_536


def recall_per_query(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """For each query, the fraction of the exact top-k found in the approximate top-k."""
    return np.array([len(set(a[:k].tolist()) & set(e[:k].tolist()) - {-1}) / k
                     for a, e in zip(approx_ids, exact_ids)], dtype=np.float64)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = RECALL_K) -> float:
    per_query = recall_per_query(approx_ids, exact_ids, k)
    return float(per_query.mean()) if len(per_query) else 0.0


def recall_lower_bound(per_query: np.ndarray) -> float:
    """Mean minus three standard errors: tuning on this keeps fresh queries (another offset, other noise) above
    the target, not just the sample that was measured."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 0.0
    return float(per_query.mean() - 3 * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def off_distribution_queries(queries: np.ndarray, rng: np.random.Generator, offset_norm: float = 1.0,
                             noise: float = 0.3) -> np.ndarray:
    """A stand-in for text queries against image vectors: one constant offset (the "modality gap") plus noise."""
    dim = queries.shape[1]
    offset = normalise_rows(rng.standard_normal(dim))[None, :] * offset_norm
    jitter = rng.standard_normal(queries.shape).astype(np.float32) * (noise / math.sqrt(dim))
    return normalise_rows(queries + offset + jitter)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = EXACT_CHUNK) -> np.ndarray:
    """Exact inner-product top-k over a (memory-mapped) matrix, chunk by chunk; all-zero rows never match."""
    queries = np.asarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.asarray(vectors[start:start + chunk], dtype=np.float32)
        scores = queries @ block.T
        scores[:, ~block.any(axis=1)] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else \
            np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        all_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        all_i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return np.where(np.isfinite(best_s), best_i, -1)


def tune_nprobe(measure: Callable[[int], float], nlist: int, target: float = TARGET_RECALL) -> tuple[int, dict[int, float]]:
    """The smallest power-of-two nprobe whose recall reaches `target` (autofaiss-style); else the best one tried."""
    table: dict[int, float] = {}
    nprobe = 1
    while True:
        table[nprobe] = measure(nprobe)
        if table[nprobe] >= target or nprobe >= nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    best = next((p for p in table if table[p] >= target), max(table, key=lambda p: (table[p], -p)))
    return best, table



def self_check(index: faiss.Index, vectors: np.ndarray, query_ids: np.ndarray, *, refine_factor: int | None,
               refine: bool, nprobe: int | None, seed: int = 0) -> tuple[int, dict[str, Any]]:
    """Recall@10 of the served configuration against exact search, for indexed vectors used as queries and for
    off-distribution ones. Unless given, nprobe is tuned to the smallest reaching TARGET_RECALL on both; when no
    nprobe does (very lossy codes), the refine factor grows through REFINE_FACTORS."""
    fixed_nprobe, fixed_factor = bool(nprobe), bool(refine_factor)
    refine_factor = refine_factor or REFINE_FACTORS[0]
    rng = np.random.default_rng(seed + 1)
    sets = {"in_distribution": normalise_rows(np.asarray(vectors[np.sort(query_ids)], dtype=np.float32))}
    sets["off_distribution"] = off_distribution_queries(sets["in_distribution"], rng)
    truth = {name: exact_top_k(q, vectors, RECALL_K) for name, q in sets.items()}

    def measure(probe: int, factor: int, name: str | None = None) -> float:
        """The named set's mean recall; without a name, the worst set's lower bound (what tuning must satisfy)."""
        set_nprobe(index, probe)
        per_set = {n: recall_per_query(search_index(index, vectors, sets[n], RECALL_K, refine_factor=factor)[1],
                                       truth[n]) for n in ([name] if name else sets)}
        return float(per_set[name].mean()) if name else min(recall_lower_bound(r) for r in per_set.values())

    ivf = faiss.try_extract_index_ivf(index)
    tuning: dict[str, float] = {}
    for factor in REFINE_FACTORS if refine and not fixed_factor else [refine_factor]:
        refine_factor = factor
        if ivf is None:
            nprobe, recall = 1, measure(1, factor if refine else 0)
            tuning[f"refine{factor}"] = round(recall, 4)
        elif not fixed_nprobe:
            nprobe, table = tune_nprobe(lambda p: measure(p, factor if refine else 0), ivf.nlist)
            tuning.update({f"nprobe{p},refine{factor if refine else 0}": round(r, 4) for p, r in table.items()})
            recall = table[nprobe]
        else:
            recall = measure(nprobe, factor if refine else 0)
        if recall >= TARGET_RECALL:
            break
    report: dict[str, Any] = {"k": RECALL_K, "queries": len(query_ids), "nprobe": nprobe, "target": TARGET_RECALL,
                              "refine_factor": refine_factor, "tuning_lower_bounds": tuning}
    for name in sets:
        report[name] = {"refine": round(measure(nprobe, refine_factor, name), 4),
                        "no_refine": round(measure(nprobe, 0, name), 4)}
    report["served"] = round(min(report[n]["refine" if refine else "no_refine"] for n in sets), 4)
    report["target_met"] = report["served"] >= TARGET_RECALL
    set_nprobe(index, nprobe)
    return nprobe, report
