"""Choosing the served setting by measured time (issue 31): the self-check's bounds say which settings hold recall,
a clock on this machine says which of them is fastest, and exact search is among the candidates.

The modelled cost (`selfcheck.serving_cost`) only orders and prunes what gets timed: on real CLIP embeddings (47k)
it chose a ×500 re-rank that answered in 6.0 ms a query where a one-thread exact scan took 6.1. Every candidate is
timed one query at a time with FAISS on one thread (its own threads cost more than they give on a single query),
the candidates interleaved query by query so a noisy neighbour slows them all alike; the median wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from clip_hpc.ann.core import search_index, set_nprobe
from clip_hpc.ann.rows import add_embedded_rows
from clip_hpc.ann.tier import TierScorer

TIMING_QUERIES = 24  # single queries timed per candidate (after TIMING_WARMUP untimed ones)
TIMING_WARMUP = 2
TIMING_REPEATS = 5  # each query's fastest of this many runs counts (with 3, a setting swung 4x between builds, load 8)
TIMED_MAX = 6  # approximate settings timed: the non-dominated ones meeting the bound, by modelled cost
EXACT_SAMPLE_ROWS = 65_536  # above this, the exact scan is timed on this many rows and scaled to N first
EXACT_FULL_MARGIN = 1.5  # the scaled exact time within this factor of the best approximate: build it whole and time it
EXACT_LABEL = "exact"

Setting = tuple[int, tuple[int, int]]  # (nprobe, (refine factor, the tier's exact factor or 0))
Runner = Callable[[np.ndarray], Any]  # answers one query (a 1 x d float32 row)


@dataclass(frozen=True)
class Timed:
    """One timed candidate: its label, median ms a query (FAISS on one thread), the recall bound it reached, and
    what it is: "approximate", "exact", or "exact_scaled" (timed on EXACT_SAMPLE_ROWS rows, scaled to N)."""

    label: str
    p50_ms: float
    bound: float
    kind: str


@dataclass
class TimedChoice:
    """What index.json records as `recall.timing`: every timed candidate and the one served."""

    candidates: list[Timed]
    chosen: str
    exact_allowed: bool
    threads: int = 1
    queries: int = TIMING_QUERIES

    @property
    def exact_wins(self) -> bool:
        return self.chosen == EXACT_LABEL

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "by": f"median over single queries of their fastest of {TIMING_REPEATS} runs, interleaved",
            "threads": self.threads,
            "queries": self.queries,
            "exact_allowed": self.exact_allowed,
            "candidates": [asdict(c) for c in self.candidates],
        }


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS on `n` OpenMP threads inside, its previous count restored after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def per_query_p50(
    runners: dict[str, Runner], queries: np.ndarray, warmup: int = TIMING_WARMUP, repeats: int = TIMING_REPEATS
) -> dict[str, float]:
    """Median ms a query of each runner, one query at a time on one FAISS thread. Each query goes through every
    runner in turn (the order rotated), `repeats` times, and counts its fastest: load from elsewhere only ever
    adds time, and falls on all of them alike (a 2-core machine at load 8 moved one scan's median 3x)."""
    rows = np.ascontiguousarray(queries, dtype=np.float32)
    names = list(runners)
    best: dict[str, list[float]] = {name: [] for name in names}
    with faiss_threads(1):
        for i, row in enumerate(rows):
            query, took = row[None, :], dict.fromkeys(names, np.inf)
            for r in range(repeats):
                for j in range(len(names)):
                    name = names[(i + r + j) % len(names)]
                    start = time.perf_counter()
                    runners[name](query)
                    took[name] = min(took[name], time.perf_counter() - start)
            if i >= warmup:
                for name in names:
                    best[name].append(took[name])
    return {name: round(1000 * float(np.median(t)), 4) if t else 0.0 for name, t in best.items()}


def timing_queries(queries: np.ndarray, n: int = TIMING_QUERIES + TIMING_WARMUP) -> np.ndarray:
    """`n` rows spread evenly over the stacked query families (in-distribution, text-like, captions)."""
    at = np.unique(np.linspace(0, len(queries) - 1, min(n, len(queries))).astype(int))
    return np.asarray(queries[at], dtype=np.float32)


def exact_flat(vectors: np.ndarray, rows: int | None = None, chunk: int = 65_536) -> faiss.Index:
    """What exact serving is: IndexFlatIP over the float32 of vectors.npy's rows (the first `rows` of them), in
    an IDMap of their global ids; all-zero rows (never embedded, or removed) are left out, as the index leaves them."""
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(int(vectors.shape[1])))
    add_embedded_rows(flat, vectors, rows, chunk)
    return flat


def flat_runner(index: faiss.Index, k: int) -> Runner:
    return lambda query: index.search(query, k)


def dominates(a: Setting, b: Setting) -> bool:
    """`a` does no more work than `b` in every respect (nprobe, candidates, rows re-read) and differs: of two
    settings that both hold the bound, `b` is never the faster one and need not be timed. A tier setting and one
    without the tier are not compared."""
    (pa, (fa, ea)), (pb, (fb, eb)) = a, b
    return a != b and bool(ea) == bool(eb) and pa <= pb and fa <= fb and ea <= eb


def frontier(meeting: list[Setting], cost: Callable[[int, Any], float], limit: int = TIMED_MAX) -> list[Setting]:
    """The settings that hold the bound and no other one dominates, cheapest by the modelled cost first."""
    kept = [s for s in meeting if not any(dominates(o, s) for o in meeting)]
    return sorted(kept, key=lambda s: cost(*s))[:limit]


def choose(candidates: list[Timed], exact_allowed: bool) -> str:
    """The fastest approximate candidate, or exact search where it is allowed and no slower."""
    approximate = [c for c in candidates if c.kind == "approximate"]
    best = min(approximate, key=lambda c: c.p50_ms)
    exact = [c for c in candidates if c.kind == EXACT_LABEL]
    if exact_allowed and exact and exact[0].p50_ms <= best.p50_ms:
        return EXACT_LABEL
    return best.label


def measure(
    approximate: dict[str, tuple[Runner, float]],
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    n_total: int,
    k: int,
    exact_allowed: bool,
    sample_rows: int = EXACT_SAMPLE_ROWS,
) -> tuple[TimedChoice, faiss.Index | None]:
    """Time every approximate setting (label -> its runner and recall bound) beside the exact scan, and choose.
    Past `sample_rows` rows the exact scan is timed on that many and scaled to `n_total` (a scan is linear
    in its rows); where that comes within EXACT_FULL_MARGIN of the best approximate time and exact serving is
    allowed, the whole scan is built and timed again beside the best approximate setting. Returns the choice,
    and the whole exact index when it was built (what is served when exact wins)."""
    sampled, timed_queries = len(vectors) > sample_rows, max(0, len(queries) - TIMING_WARMUP)
    flat = exact_flat(vectors, sample_rows if sampled else None)
    runners = {label: runner for label, (runner, _) in approximate.items()}
    p50 = per_query_p50({**runners, EXACT_LABEL: flat_runner(flat, k)}, queries)
    timed = [Timed(label, p50[label], bound, "approximate") for label, (_, bound) in approximate.items()]
    if not sampled:
        candidates = [*timed, Timed(EXACT_LABEL, p50[EXACT_LABEL], 1.0, EXACT_LABEL)]
        return TimedChoice(candidates, choose(candidates, exact_allowed), exact_allowed, queries=timed_queries), flat
    scaled = round(p50[EXACT_LABEL] * n_total / max(1, flat.ntotal), 4)
    timed.append(Timed(EXACT_LABEL, scaled, 1.0, "exact_scaled"))
    best = min((t for t in timed if t.kind == "approximate"), key=lambda t: t.p50_ms)
    if not exact_allowed or scaled > EXACT_FULL_MARGIN * best.p50_ms:
        return TimedChoice(timed, best.label, exact_allowed, queries=timed_queries), None
    del flat
    whole = exact_flat(vectors)
    again = per_query_p50({best.label: runners[best.label], EXACT_LABEL: flat_runner(whole, k)}, queries)
    timed = [Timed(t.label, again[t.label], t.bound, t.kind) if t.label == best.label else t for t in timed]
    timed.append(Timed(EXACT_LABEL, again[EXACT_LABEL], 1.0, EXACT_LABEL))
    return TimedChoice(timed, choose(timed, exact_allowed), exact_allowed, queries=timed_queries), whole


def served_runner(
    index: faiss.Index, vectors: np.ndarray, refined: TierScorer | None, probe: int, config: tuple[int, int], k: int
) -> Runner:
    """One query through the served search at (nprobe, (refine factor, tier exact factor)), as the engine runs it."""
    factor, exact_factor = config

    def run(query: np.ndarray) -> Any:
        set_nprobe(index, probe)
        return search_index(
            index,
            vectors if factor else None,
            query,
            k,
            refine_factor=factor,
            tier=refined if exact_factor else None,
            exact_factor=exact_factor,
        )

    return run
