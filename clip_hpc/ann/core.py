"""The pure search core: numpy and FAISS in, numpy out. The serving engine and the build's recall self-check both
search through it, so the self-check measures exactly what is served without importing the engine.

IVF-PQ finds candidates cheaply; `refine` re-ranks k×factor of them by exact dot product with the float16
vectors in `vectors.npy`, which wins back the recall PQ loses on off-distribution (text) queries.
"""

from __future__ import annotations

import faiss
import numpy as np

from clip_hpc.ann.graph import graph_of
from clip_hpc.ann.tier import TierScorer
from clip_hpc.errors import UserError

MIN_RERANK_K = 10
DEFAULT_WEIGHTS = {"text": 1.0, "image": 1.0, "vector": 1.0, "positive": 0.75, "negative": 0.25}  # Rocchio-like


# ------------------------------------------------------------------------
def normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def unit_vector(values: np.ndarray) -> np.ndarray:
    """`values` scaled to length 1 in float64, by its largest entry first: in float32 a norm overflows from about
    1e19 per entry and vanishes below 1e-23, and either read as a zero vector ("the parts cancel out")."""
    v = np.asarray(values, dtype=np.float64)
    top = float(np.abs(v).max(initial=0.0))
    if top == 0.0:
        raise UserError("the query vector is all zeros: it points nowhere; give a vector with a direction")
    v = v / top
    return (v / np.linalg.norm(v)).astype(np.float32)


SMALL_RERANK_ROWS = 32  # up to here one numpy cast and product (a x2 re-rank of 10 results is 20 rows)
RERANK_BLOCK_ROWS = 64  # x 512 dims = torch's 32,768-element grain: each block converts on one thread, in cache


def exact_scores(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 dot products of stored (float16) rows with one query, a cache-sized block at a time. numpy's
    float16 cast is ~3x slower than torch's, and one large torch cast or BLAS call spreads over threads that, on a
    busy node, cost 5-10x the work (2,000 rows: 1-4 ms this way, 11-20 ms as one call, at load 7 on 2 cores). The
    filter scan's `subsets.scoring._block_products` is the same idea for many queries; through it, this one query
    took 1.7x as long (0.65 against 0.38 ms for 2,000 rows: a generator and two more small torch calls a block).
    Up to SMALL_RERANK_ROWS numpy is as fast, and its few code paths stay in cache where torch's dispatch does not:
    20 rows scored right after a 94 MB exact scan took 0.11 ms with numpy, 0.28 with torch."""
    if len(rows) <= SMALL_RERANK_ROWS:
        return np.asarray(rows, dtype=np.float32) @ np.asarray(query, dtype=np.float32)
    import torch

    source = torch.from_numpy(np.ascontiguousarray(rows))
    target = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    out = torch.empty(len(source), dtype=torch.float32)
    block = torch.empty((min(RERANK_BLOCK_ROWS, len(source)), source.shape[1]), dtype=torch.float32)
    for lo in range(0, len(source), RERANK_BLOCK_ROWS):
        part = source[lo : lo + RERANK_BLOCK_ROWS]
        converted = block[: len(part)]
        converted.copy_(part)
        torch.mv(converted, target, out=out[lo : lo + len(part)])
    return out.numpy()


def rerank(queries: np.ndarray, cand_ids: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-rank of candidate ids (-1 = none) by dot product with their full vectors; returns (scores, ids)."""
    m = len(queries)
    scores = np.full((m, k), -np.inf, dtype=np.float32)
    ids = np.full((m, k), -1, dtype=np.int64)
    for i in range(m):
        cand = np.unique(cand_ids[i][cand_ids[i] >= 0])  # sorted: friendlier to the memory map
        if not len(cand):
            continue
        exact = exact_scores(vectors[cand], queries[i])
        top = np.argsort(-exact, kind="stable")[:k]
        scores[i, : len(top)], ids[i, : len(top)] = exact[top], cand[top]
    return scores, ids


def mmr(query: np.ndarray, cand_vectors: np.ndarray, k: int, diversity: float) -> list[int]:
    """Maximal marginal relevance: indices into the candidates, trading relevance for novelty by `diversity`."""
    relevance = cand_vectors @ query
    similarity = cand_vectors @ cand_vectors.T
    chosen: list[int] = []
    redundancy = np.full(len(cand_vectors), -np.inf, dtype=np.float32)
    remaining = np.ones(len(cand_vectors), dtype=bool)
    for _ in range(min(k, len(cand_vectors))):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        gain = np.where(remaining, (1.0 - diversity) * relevance - diversity * penalty, -np.inf)
        best = int(np.argmax(gain))
        chosen.append(best)
        remaining[best] = False
        redundancy = np.maximum(redundancy, similarity[best])
    return chosen


MAX_WEIGHT = 1e6  # weights are relative; beyond this the weighted sum could overflow float32


def combine_parts(parts: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of the normalised query parts, `negative` subtracted (Rocchio), renormalised."""
    for name, weight in weights.items():
        if not np.isfinite(float(weight)) or abs(float(weight)) > MAX_WEIGHT:
            raise UserError(
                f"weight {name!r} = {weight} would overflow: weights are relative, keep them finite and "
                f"at most {MAX_WEIGHT:g} in size"
            )
    total = np.zeros_like(next(iter(parts.values())), dtype=np.float32)
    for name, vector in parts.items():
        sign = -1.0 if name == "negative" else 1.0
        total += sign * float(weights.get(name, DEFAULT_WEIGHTS.get(name, 1.0))) * normalise_rows(vector)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise UserError("the query parts cancel out (weights or negatives remove everything); change the weights")
    return total / norm


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """The search width, through any wrapper (IDMap, PreTransform): an IVF index's nprobe, an HNSW graph's
    efSearch (the same knob: how much of the index a query visits; index.json's `nprobe` holds either); a no-op
    for a flat scan."""
    if faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    elif graph_of(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(nprobe))


def search_index(
    index: faiss.Index,
    vectors: np.ndarray | None,
    queries: np.ndarray,
    k: int,
    *,
    refine_factor: int = 0,
    selector: faiss.IDSelector | None = None,
    widen: bool = False,
    tier: TierScorer | None = None,
    exact_factor: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The served search: k×refine_factor candidates from FAISS, re-ranked exactly when refine_factor > 0; with a
    re-rank tier, the tier re-scores them in RAM and only its best k×exact_factor are re-ranked exactly. `widen`
    (the engine, not the recall self-check, which measures nprobe as it is) fills short result lists."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n_cand = candidate_count(index, k, refine_factor if vectors is not None else 0)
    scores, ids = search_candidates(index, queries, n_cand, min(k, index.ntotal), selector=selector, widen=widen)
    if not (refine_factor and vectors is not None):
        return scores[:, :k], ids[:, :k]
    if tier is not None and exact_factor:
        ids = tier.best(queries, ids, tier_keep(k, exact_factor, n_cand))
    return rerank(queries, ids, vectors, k)


def search_index_rows(
    index: faiss.Index,
    vectors: np.ndarray | None,
    queries: np.ndarray,
    ks: list[int],
    *,
    refine_factor: int = 0,
    tier: TierScorer | None = None,
    exact_factor: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`search_index(..., widen=True)` of each row with its own k, as a batch: the codes searched once per distinct
    k (k sets the candidate count), the tier once for every row (a server micro-batch is one tier call), each
    row cut back to the candidates it would keep alone; (scores, ids) of each row."""
    if not ks:
        return []
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    factor = refine_factor if vectors is not None else 0
    found: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty(0, dtype=np.int64))] * len(ks)
    for k in sorted(set(ks)):
        rows = [i for i, row_k in enumerate(ks) if row_k == k]
        n_cand = candidate_count(index, k, factor)
        scores, ids = search_candidates(index, queries[rows], n_cand, min(k, index.ntotal), widen=True)
        for at, i in enumerate(rows):
            found[i] = (scores[at], ids[at])
    if vectors is None or not factor:
        return [(scores[:k], ids[:k]) for k, (scores, ids) in zip(ks, found)]
    cands = [ids for _, ids in found]
    if tier is not None and exact_factor:
        keeps = [tier_keep(k, exact_factor, len(c)) for k, c in zip(ks, cands)]
        padded = np.full((len(ks), max(len(c) for c in cands)), -1, dtype=np.int64)
        for i, c in enumerate(cands):
            padded[i, : len(c)] = c
        kept = tier.best(queries, padded, max(keeps))
        cands = [row[:keep] for row, keep in zip(kept, keeps)]
    return [_rerank_one(queries[i], c, vectors, k) for i, (k, c) in enumerate(zip(ks, cands))]


def _rerank_one(query: np.ndarray, cand: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = rerank(query[None, :], cand[None, :], vectors, k)
    return scores[0], ids[0]


def candidate_count(index: faiss.Index, k: int, refine_factor: int) -> int:
    """Candidates a query takes from the codes: k×refine_factor, and k < 10 re-ranks as many as k = 10 does (so
    the self-measured recall@10 holds for it too); never more than the index holds."""
    n_cand = max(k, MIN_RERANK_K) * refine_factor if refine_factor else k
    return max(k, min(n_cand, max(index.ntotal, 1)))


def tier_keep(k: int, exact_factor: int, n_cand: int) -> int:
    """How many of a query's candidates the tier hands to the exact re-rank."""
    return max(k, min(max(k, MIN_RERANK_K) * exact_factor, n_cand))


def search_candidates(
    index: faiss.Index,
    queries: np.ndarray,
    n_cand: int,
    wanted: int,
    *,
    selector: faiss.IDSelector | None = None,
    widen: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The codes' best `n_cand` of every query (ids -1 where lists run dry); with `widen`, rows holding fewer than
    `wanted` are searched again over every list."""
    params = None
    if selector is not None:
        ivf, graph = faiss.try_extract_index_ivf(index), graph_of(index)
        params = (
            faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
            if ivf is not None
            else faiss.SearchParametersHNSW(sel=selector, efSearch=graph.hnsw.efSearch)
            if graph is not None
            else faiss.SearchParameters(sel=selector)
        )
    found = ivf_search(index, queries, n_cand) if params is None else None
    scores, ids = found if found is not None else index.search(queries, n_cand, params=params)
    if widen:
        scores, ids = _widen_if_short(index, queries, n_cand, wanted, selector, scores, ids)
    return scores, ids


def ivf_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`index.search` for a CPU IVF index under optional pre-transforms (OPQ), as the coarse quantizer's search and
    then `search_preassigned`: the same results without the thread that faiss 1.15's IndexIVF.search starts on
    every call (traced: one query at nprobe 64, 1.6 ms -> 0.4 ms). None for any other index (Flat, GPU)."""
    index = faiss.downcast_index(index)
    transforms = []
    if isinstance(index, faiss.IndexPreTransform):
        transforms = [index.chain.at(i) for i in range(index.chain.size())]
        index = faiss.downcast_index(index.index)
    if not isinstance(index, faiss.IndexIVF):
        return None
    for transform in transforms:
        queries = transform.apply(queries)
    coarse_scores, lists = index.quantizer.search(queries, min(index.nprobe, index.nlist))
    return index.search_preassigned(queries, k, lists, coarse_scores)


def _widen_if_short(
    index: faiss.Index,
    queries: np.ndarray,
    n_cand: int,
    wanted: int,
    selector: faiss.IDSelector | None,
    scores: np.ndarray,
    ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """IVF returns fewer than k when the probed lists run dry (k=1000 of 2,000 vectors gave 536): search the short
    rows again over every list, so a query gets min(k, n) results whenever filters leave that many. Only the short
    rows: a row of a batch then gets what it would get searched alone."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.nprobe >= ivf.nlist:
        return scores, ids
    short = np.flatnonzero((ids >= 0).sum(axis=1) < wanted)
    if not len(short):
        return scores, ids
    params = (
        faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nlist))
        if selector is not None
        else faiss.SearchParametersIVF(nprobe=int(ivf.nlist))
    )
    scores, ids = scores.copy(), ids.copy()
    scores[short], ids[short] = index.search(np.ascontiguousarray(queries[short]), n_cand, params=params)
    return scores, ids
