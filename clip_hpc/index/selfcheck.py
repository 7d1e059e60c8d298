"""The recall self-check of an index: recall@10 of the served configuration against exact inner-product search,
for indexed vectors used as queries, for text-like ones (clip_hpc.index.text_queries: CLIP's "modality gap" puts a
text query at cosine ~0.25-0.45 from its best image) and for real captions through the index's own model, and
the nprobe / refine-factor tuning built on it. Tuning and reporting use disjoint halves of every query family.

The gap's direction is unknown when the index is built, and recall depends on it (at 1M synthetic vectors, one
direction gave 0.98 and another 0.94 with the same nprobe), so the off-distribution queries come in groups, each
with its own direction and noise, and tuning holds a *fresh* group, not the mean, above the target.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import faiss
import numpy as np

from clip_hpc.search.core import normalise_rows, search_index, set_nprobe
from clip_hpc.index.text_queries import caption_queries, text_like_groups

TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_QUERIES = 800  # indexed vectors sampled: half tune, half report (each also the base of text-like groups)
TEXT_GROUPS = 10  # text-like gap groups per half, each with its own direction
OFF_DIRECTIONS = 8  # offset directions in the off-distribution set, one group of queries each
OFF_NOISES = (0.2, 0.3, 0.5)  # per-query noise, cycled over the groups
PREDICTION_Z = 2.0  # t(0.95, 7 d.f.)·√(1 + 1/8): a one-sided 95% prediction bound for a 9th group of 8
REFINE_FACTORS = (10, 25, 50, 100, 200, 500, 1000, 2000, 5000)  # candidates per result re-ranked exactly (1 KiB
# rows at d=512). Past 200 only for data where the 32-byte code ranks text-like queries badly (many small clusters:
# at 300k, nprobe all, x200 gave 0.887, x500 0.955, x1000 0.980): recall first, at the latency bench_index shows.
RERANK_BYTE_COST = 7  # a re-ranked float16 row costs ~7x its bytes in scanned PQ codes (measured, 2 cores, d=512)
EXACT_CHUNK = 65_536
SELF_CHECK_SALT = 0x5E1F_C4EC  # default_rng(seed + 1) drew offsets equal to the synthetic data's cluster centres


def recall_per_query(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """For each query, the fraction of the exact top-k found in the approximate top-k."""
    return np.array([len(set(a[:k].tolist()) & set(e[:k].tolist()) - {-1}) / k
                     for a, e in zip(approx_ids, exact_ids)], dtype=np.float64)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = RECALL_K) -> float:
    per_query = recall_per_query(approx_ids, exact_ids, k)
    return float(per_query.mean()) if len(per_query) else 0.0


def recall_lower_bound(per_query: np.ndarray) -> float:
    """Mean minus three standard errors: for i.i.d. queries (indexed vectors), tuning on this keeps fresh ones
    above the target, not just the sample that was measured."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 0.0
    return float(per_query.mean() - 3 * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def recall_prediction_bound(group_means: np.ndarray, z: float = PREDICTION_Z) -> float:
    """Mean minus z standard deviations of the group means: what a fresh group (another gap direction, other
    queries) stays above 95% of the time; the spread between directions, not the number of queries, limits it."""
    if len(group_means) < 2:
        return float(group_means.mean()) if len(group_means) else 0.0
    return float(group_means.mean() - z * group_means.std(ddof=1))


def off_distribution_queries(queries: np.ndarray, rng: np.random.Generator, offset_norm: float = 1.0,
                             noise: float = 0.3) -> np.ndarray:
    """A stand-in for text queries against image vectors: one constant offset (the "modality gap") plus noise."""
    dim = queries.shape[1]
    offset = normalise_rows(rng.standard_normal(dim))[None, :] * offset_norm
    jitter = rng.standard_normal(queries.shape).astype(np.float32) * (noise / math.sqrt(dim))
    return normalise_rows(queries + offset + jitter)


def off_distribution_groups(queries: np.ndarray, rng: np.random.Generator,
                            directions: int = OFF_DIRECTIONS) -> list[np.ndarray]:
    """The queries cut into `directions` groups, each shifted by its own random offset, with noise levels cycled."""
    groups = np.array_split(np.asarray(queries, dtype=np.float32), max(1, min(directions, len(queries))))
    return [off_distribution_queries(g, rng, noise=OFF_NOISES[i % len(OFF_NOISES)]) for i, g in enumerate(groups)]


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



def tune_jointly(measure: Callable[[int, int], float], factors: list[int], nlist: int,
                 cost: Callable[[int, int], float], target: float = TARGET_RECALL) -> tuple[tuple[int, int], dict]:
    """(nprobe, refine factor): for each factor the smallest nprobe reaching `target`, searched only while cheaper
    than the best pair so far; the cheapest pair wins. When none reaches it, the pair with the best recall.
    A factor whose widest affordable nprobe misses the target is not searched below it (recall grows with nprobe):
    on hard data that skips most of the sweep, whose large factors cost seconds a measurement at 1M vectors."""
    seen: dict[tuple[int, int], float] = {}
    best: tuple[int, int] | None = None
    for factor in factors:
        limit = nlist if best is None else max((p for p in range(1, nlist + 1) if cost(p, factor) < cost(*best)),
                                               default=0)
        if limit < 1:
            continue
        seen[(limit, factor)] = measure(limit, factor)
        if seen[(limit, factor)] < target:
            continue
        probe, table = tune_nprobe(lambda p: seen[(p, factor)] if (p, factor) in seen else measure(p, factor),
                                   limit, target)
        seen.update({(p, factor): r for p, r in table.items()})
        if table[probe] >= target and (best is None or cost(probe, factor) < cost(*best)):
            best = (probe, factor)
    return best or max(seen, key=lambda pf: (seen[pf], -cost(*pf))), seen


def serving_cost(nprobe: int, factor: int, *, list_size: float, code_size: int, dim: int) -> float:
    """Bytes one query touches: the codes of `nprobe` inverted lists plus the re-ranked float16 rows, weighted."""
    return nprobe * list_size * code_size + RERANK_BYTE_COST * factor * RECALL_K * dim * 2


def _family_spans(families: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, dict[str, list[tuple[int, int]]]]:
    """All query groups stacked into one matrix, and each family's (start, stop) rows per group."""
    parts, spans, at = [], {}, 0
    for name, groups in families.items():
        spans[name] = []
        for group in groups:
            parts.append(group)
            spans[name].append((at, at + len(group)))
            at += len(group)
    return np.concatenate(parts), spans


def _query_families(vectors: np.ndarray, ids: np.ndarray, captions: np.ndarray | None,
                    rng: np.random.Generator) -> tuple[dict[str, list[np.ndarray]], list[float]]:
    """in_distribution (indexed vectors), text_like (gap groups, cosines 0.45-0.25), captions (if any)."""
    images = normalise_rows(np.asarray(vectors[np.sort(ids)], dtype=np.float32))
    text = text_like_groups(images, rng, TEXT_GROUPS)
    families = {"in_distribution": [images], "text_like": [q for _, q in text]}
    if captions is not None and len(captions):
        families["captions"] = [normalise_rows(captions)]
    return families, [c for c, _ in text]


def self_check(index: faiss.Index, vectors: np.ndarray, query_ids: np.ndarray, *, refine_factor: int | None,
               refine: bool, nprobe: int | None, seed: int = 0, model: str | None = None,
               pretrained: str | None = None) -> tuple[int, dict[str, Any]]:
    """Recall@10 of the served configuration against exact search, for three query families: indexed vectors,
    synthetic text-like groups (one gap direction each, cosine to their image 0.45 down to 0.25) and the built-in
    captions through the index's own text tower (when its weights load here). Half of every family tunes nprobe
    and the refine factor jointly (the cheapest pair whose 3-sigma bounds, and for the gap groups the prediction
    bound of a fresh group, all reach TARGET_RECALL); the other half, never seen by tuning, gives the figures."""
    rng = np.random.default_rng([seed, SELF_CHECK_SALT])  # a stream of its own: never the one data came from
    ids = np.asarray(query_ids)
    text = caption_queries(model, pretrained, int(vectors.shape[1])) if model else None
    caption_vectors = text.vectors if text is not None else None
    halves = []
    for half in range(2):
        caps = None if caption_vectors is None else caption_vectors[half::2]
        halves.append(_query_families(vectors, ids[half::2], caps, rng))
    (tune_families, _), (report_families, report_cosines) = halves
    tune_queries, tune_spans = _family_spans(tune_families)
    report_queries, report_spans = _family_spans(report_families)
    truth = exact_top_k(np.concatenate([tune_queries, report_queries]), vectors, RECALL_K)  # one pass for all
    tune_truth, report_truth = truth[:len(tune_queries)], truth[len(tune_queries):]

    def per_query(queries: np.ndarray, exact: np.ndarray, probe: int, factor: int) -> np.ndarray:
        set_nprobe(index, probe)
        return recall_per_query(search_index(index, vectors, queries, RECALL_K, refine_factor=factor)[1], exact)

    tuning: dict[str, float] = {}

    def bound(probe: int, factor: int) -> float:
        recall = per_query(tune_queries, tune_truth, probe, factor)
        bounds = [recall_prediction_bound(np.array([recall[a:b].mean() for a, b in tune_spans["text_like"]]))]
        bounds += [recall_lower_bound(recall[a:b]) for name in ("in_distribution", "captions")
                   for a, b in tune_spans.get(name, [])]
        tuning[f"nprobe{probe},refine{factor}"] = value = round(min(bounds), 4)
        return value

    factors = [refine_factor] if refine and refine_factor else list(REFINE_FACTORS) if refine else [0]
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or nprobe:  # nprobe fixed (or meaningless): only the refine factor is tuned
        fixed = 1 if ivf is None else int(nprobe)
        (_, factor), _ = tune_jointly(lambda _p, f: bound(fixed, f), factors, 1, cost=lambda _p, f: f)
        nprobe = fixed
    else:
        def cost(probe: int, factor: int) -> float:
            return serving_cost(probe, factor, list_size=ivf.ntotal / ivf.nlist, code_size=ivf.code_size, dim=ivf.d)

        (nprobe, factor), _ = tune_jointly(bound, factors, ivf.nlist, cost)
    shown_factor = factor or refine_factor or REFINE_FACTORS[0]  # refine numbers are shown even when it is off
    report: dict[str, Any] = {
        "k": RECALL_K, "target": TARGET_RECALL, "nprobe": nprobe, "refine_factor": shown_factor,
        "tuning_queries": int(len(tune_queries)), "queries": int(len(report_queries)),
        "off_directions": len(report_spans["text_like"]), "text_like_cosines": list(report_cosines),
        "captions_source": text.source if text is not None else "none",
        "tuning_lower_bounds": tuning}
    if text is not None and text.reason:
        report["captions_fallback"] = text.reason
    label = "refine" if factor else "no_refine"
    for name, served_factor in (("refine", shown_factor), ("no_refine", 0)):
        recall = per_query(report_queries, report_truth, nprobe, served_factor)
        for family, spans in report_spans.items():
            key = "off_distribution" if family == "text_like" else family
            means = np.array([recall[a:b].mean() for a, b in spans])
            report.setdefault(key, {})[name] = round(float(recall[spans[0][0]:spans[-1][1]].mean()), 4)
            if family == "text_like":
                report[key][f"{name}_worst_direction"] = round(float(means.min()), 4)
                report[key][f"{name}_by_cosine"] = {
                    f"{c:.2f}": round(float(np.mean([m for m, cc in zip(means, report_cosines) if cc == c])), 4)
                    for c in sorted(set(report_cosines), reverse=True)}
    report["served"] = round(min(report[f][label] for f in ("in_distribution", "off_distribution", "captions")
                                 if f in report), 4)
    report["served_bound"] = tuning[f"nprobe{nprobe},refine{factor}"]
    report["target_met"] = report["served_bound"] >= TARGET_RECALL and report["served"] >= TARGET_RECALL
    set_nprobe(index, nprobe)
    return nprobe, report
