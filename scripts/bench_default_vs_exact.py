#!/usr/bin/env python
"""The default index against exact search, side by side (issue 31 item 1): `clip-hpc index` with no flags, then its
served search and FAISS IndexFlatIP over the same float32 rows, one query at a time, interleaved in one process,
FAISS on one thread; p50/p99 ms, recall@10 on held-out queries (clip_hpc.bench.heldout) beside index.json's claim,
and the times the build chose by (index.json recall.timing). Prints JSON per data set, then a table.

    bench_default_vs_exact.py [--npy PATH ...] [--sizes 12000,50000] [--dim 512] [--seed 1] [--work DIR]

`--npy` takes real embeddings (an N x d float array, kept outside the repository); without it, the held-out
mixture of clip_hpc.bench.heldout at each size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clip_hpc.ann.core import normalise_rows, search_index
from clip_hpc.bench.heldout import VectorQueriesOnly, evaluate, heldout_mixture_params
from clip_hpc.devdata.synthetic_vectors import gaussian_mixture, write_emb_dir
from clip_hpc.index.build import build_index
from clip_hpc.index.timed_choice import TIMING_REPEATS, faiss_threads, per_query_p50
from clip_hpc.search.engine import SearchEngine

TIMED_QUERIES = 200
QUERY_SEED = 7177  # neither the data's, the self-check's nor the held-out check's


def side_by_side(index_dir: Path, queries: np.ndarray) -> dict[str, Any]:
    """Per-query ms of the served search and of IndexFlatIP (float32 of vectors.npy), interleaved, one thread."""
    engine = SearchEngine(index_dir, encoder=VectorQueriesOnly(int(queries.shape[1])))
    try:
        rows = np.asarray(engine.vectors, dtype=np.float32)
        flat = faiss.IndexFlatIP(rows.shape[1])
        flat.add(rows)

        def served(q: np.ndarray) -> Any:
            return search_index(
                engine.index,
                engine.vectors,
                q,
                10,
                refine_factor=engine.refine_factor,
                tier=engine.tier,
                exact_factor=engine.exact_factor,
            )

        runs = {"default": served, "exact": lambda q: flat.search(q, 10)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        with faiss_threads(1):
            for i, row in enumerate(np.ascontiguousarray(queries, dtype=np.float32)):
                for name in list(runs)[i % 2 :] + list(runs)[: i % 2]:
                    start = time.perf_counter()
                    runs[name](row[None, :])
                    times[name].append(1000 * (time.perf_counter() - start))
        out = {f"{name}_p50_ms": round(float(np.median(t[2:])), 3) for name, t in times.items()}
        out.update({f"{name}_p99_ms": round(float(np.percentile(t[2:], 99)), 3) for name, t in times.items()})
        best = per_query_p50(runs, queries)  # each query's fastest of TIMING_REPEATS runs: what the build chooses by
        out.update({f"{name}_best_p50_ms": ms for name, ms in best.items()})
        out["ratio_p50"] = round(out["default_p50_ms"] / out["exact_p50_ms"], 3)
        out["ratio_best_p50"] = round(best["default"] / best["exact"], 3)
        return out
    finally:
        engine.close()


def bench(name: str, vectors: np.ndarray, work: Path) -> dict[str, Any]:
    emb, index_dir = work / f"{name}-emb", work / f"{name}-index"
    for path in (emb, index_dir):
        shutil.rmtree(path, ignore_errors=True)
    write_emb_dir(emb, vectors, np.zeros(len(vectors), dtype=np.int64), 10_000)
    start = time.perf_counter()
    info = build_index(emb, index_dir, progress=False)
    build_s = round(time.perf_counter() - start, 1)
    rng = np.random.default_rng(QUERY_SEED)
    rows = np.asarray(np.load(index_dir / "vectors.npy", mmap_mode="r")[rng.choice(len(vectors), TIMED_QUERIES)])
    queries = normalise_rows(rows.astype(np.float32) + rng.standard_normal(rows.shape).astype(np.float32) * 0.02)
    timing = info.recall.get("timing") or {}
    return {
        "data": name,
        "n": info.n,
        "dim": info.dim,
        "index_key": info.index_key,
        "built_key": timing.get("built_key", info.index_key),
        "nprobe": info.nprobe,
        "refine_factor": info.refine_factor if info.refine else None,
        "tier": info.tier,
        "build_s": build_s,
        "chosen_by": timing,
        **side_by_side(index_dir, queries),
        "heldout": evaluate(index_dir),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"| data | n | served (built) | default p50/p99 ms | exact p50/p99 ms | ratio (best of {TIMING_REPEATS}) "
        "| recall in / text (claim) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["heldout"]
        served = f"{r['index_key']} nprobe {r['nprobe']} refine {r['refine_factor']}" + (" +tier" if r["tier"] else "")
        lines.append(
            f"| {r['data']} | {r['n']} | {served} ({r['built_key']}) | {r['default_p50_ms']}/{r['default_p99_ms']} "
            f"| {r['exact_p50_ms']}/{r['exact_p99_ms']} | {r['ratio_p50']} ({r['ratio_best_p50']}) "
            f"| {h['in_distribution']} / {h['text_like']} ({h['claimed']['text_like']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npy", nargs="*", default=[], help="real embeddings, N x d (outside the repository)")
    ap.add_argument("--sizes", default="12000,50000", help="synthetic sizes when no --npy is given")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1, help="mixture seed (its parameters are drawn from it)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-exact-"))
    work.mkdir(parents=True, exist_ok=True)
    sets: list[tuple[str, np.ndarray]] = [(Path(p).stem, np.load(p).astype(np.float32)) for p in args.npy]
    for n in [] if args.npy else [int(s) for s in args.sizes.split(",")]:
        p = heldout_mixture_params(n, args.seed)
        x, _ = gaussian_mixture(
            n, args.dim, p.clusters, latent=p.latent, spread=p.spread, noise=p.noise, seed=args.seed
        )
        sets.append((f"mixture{n // 1000}k-s{args.seed}", x))
    rows = []
    for name, vectors in sets:
        row = bench(name, normalise_rows(vectors), work)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(table(rows))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
