#!/usr/bin/env python
"""The re-rank tier's cost a candidate, before and after (issue 31, item 3), side by side in one process: FAISS's
IndexRefine over the IVF index (what served queries went through: a distance-computer call per candidate, one
thread a query) against `TierScorer` (the candidates' codes gathered and scanned, a query's candidates cut across
threads), for one query at a time and for a server micro-batch, at several candidate counts. The tier cost a
candidate is the tiered search's time less the codes' own search of the same candidates, over the candidates.
Measurements are interleaved round-robin and the median kept (a shared machine is noisy: read the ratios).
Prints JSON (one object per row), then a table.

    bench_tier.py [--n 200000] [--dim 512] [--candidates 2000,5000,20000] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import faiss
import numpy as np

from clip_hpc.ann.core import ivf_search, normalise_rows, set_nprobe
from clip_hpc.ann.tier import TierScorer, refine_over
from clip_hpc.cluster.jobenv import job_env
from clip_hpc.devdata.synthetic_vectors import gaussian_mixture
from clip_hpc.index.choose import choose_index_key
from clip_hpc.index.rerank_tier import train_tier

KEEP = 200  # the tier's best handed to the exact re-rank (k=10, exact factor 20)


def build(n: int, dim: int, seed: int) -> tuple[faiss.Index, faiss.Index, np.ndarray, np.ndarray]:
    """The default IVF index of n mixture vectors, its SQ4 tier (trained and filled), the tier's codes, queries."""
    vectors, _ = gaussian_mixture(n, dim, seed=seed)
    vectors = normalise_rows(vectors)
    index = faiss.index_factory(dim, choose_index_key(n, dim), faiss.METRIC_INNER_PRODUCT)
    sample = vectors[np.random.default_rng(seed).choice(n, min(n, 65_536), replace=False)]
    index.train(sample)
    index.add(vectors)
    tier = train_tier(sample)
    codes = tier.sa_encode(vectors)
    tier.add_sa_codes(codes)
    queries = normalise_rows(vectors[:64] + np.random.default_rng(seed + 1).standard_normal((64, dim)) * 0.05)
    return index, tier, codes, queries.astype(np.float32)


def median_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each callable, run round-robin so that all share the machine's noise."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm: the pool's threads, the scratch indexes, the page cache
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def paths(
    index: faiss.Index, refine: faiss.IndexRefine, scorers: tuple[TierScorer, TierScorer], q: np.ndarray, n_cand: int
) -> dict[str, Callable[[], object]]:
    """What is timed for one (queries, candidates): the codes' search as IndexRefine runs it and as the engine
    does (`ivf_search`), IndexRefine's whole tiered search, and the scorers over the same candidates."""
    params = faiss.IndexRefineSearchParameters(k_factor=n_cand / KEEP)
    found = ivf_search(index, q, n_cand)
    assert found is not None
    one, many = scorers
    return {
        "codes": lambda: index.search(q, n_cand),
        "refine": lambda: refine.search(q, KEEP, params=params),
        "codes_ivf": lambda: ivf_search(index, q, n_cand),
        "scorer_1": lambda: one.best(q, found[1], KEEP),
        f"scorer_{many.threads}": lambda: many.best(q, found[1], KEEP),
    }


def measure(
    index: faiss.Index, tier: faiss.Index, codes: np.ndarray, queries: np.ndarray, args: argparse.Namespace
) -> list[dict]:
    """One row per (candidates, batch size): ms of each path and µs per candidate of the tier's part."""
    refine = refine_over(index, tier)
    trained = faiss.clone_index(tier)
    trained.reset()
    one, many = TierScorer(trained, codes, 1), TierScorer(trained, codes, args.threads)
    faiss.omp_set_num_threads(1)  # the serving setting with the model on the CPU, and the fair one-query budget
    rows = []
    for n_cand in args.candidates:
        for batch in (1, args.batch):
            q = queries[:batch]
            ms = median_ms(paths(index, refine, (one, many), q, n_cand), args.repeats)
            per = batch * n_cand / 1e3  # thousands of candidates: ms per 1k = µs per candidate
            before = (ms["refine"] - ms["codes"]) / per
            after = {name: ms[name] / per for name in ms if name.startswith("scorer_")}
            rows.append(
                {
                    "candidates": n_cand,
                    "batch": batch,
                    "threads": args.threads,
                    "ms": {name: round(value, 3) for name, value in ms.items()},
                    "us_per_candidate_before": round(before, 4),
                    **{f"us_per_candidate_{name}": round(value, 4) for name, value in after.items()},
                    "ratio_after_before": round(after[f"scorer_{args.threads}"] / before, 3) if before > 0 else None,
                    "tiered_query_ms_before": round(ms["refine"], 3),
                    "tiered_query_ms_after": round(ms["codes_ivf"] + ms[f"scorer_{args.threads}"], 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    many.close()
    return rows


def table(rows: list[dict], threads: int) -> str:
    lines = [
        "| candidates | batch | before: IndexRefine µs/cand | after, 1 thread | "
        f"after, {threads} threads | after/before | tiered search ms before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['candidates']:,} | {r['batch']} | {r['us_per_candidate_before']:.3f} | "
            f"{r['us_per_candidate_scorer_1']:.3f} | {r[f'us_per_candidate_scorer_{threads}']:.3f} | "
            f"{r['ratio_after_before']} | {r['tiered_query_ms_before']:.2f} → {r['tiered_query_ms_after']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--candidates", default="2000,5000,20000")
    parser.add_argument("--batch", type=int, default=8, help="queries in a micro-batch")
    parser.add_argument("--threads", type=int, default=job_env().cpus, help="the scorer's threads (default: CPUs)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.candidates = [int(c) for c in args.candidates.split(",")]
    started = time.perf_counter()
    index, tier, codes, queries = build(args.n, args.dim, args.seed)
    nlist = faiss.extract_index_ivf(index).nlist
    set_nprobe(index, min(nlist, -(-4 * max(args.candidates) * nlist // args.n)))  # 4x the candidates in reach
    print(f"built {args.n:,} x {args.dim} in {time.perf_counter() - started:.1f} s", flush=True)
    rows = measure(index, tier, codes, queries, args)
    print(table(rows, args.threads))


if __name__ == "__main__":
    main()
