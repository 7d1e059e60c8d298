#!/usr/bin/env python
"""`clip-hpc index --max-ram` honoured (issue 31, item 2): the same held-out mixture built under three budgets, the
largest that admits the SQ4 tier, the 8-bit PQ tier, and no tier (from `index/memory.py`'s estimate), each with the
RAM-resident bytes measured (the files `serve` holds: index.faiss, lists.ivfdata, tier.faiss, tier_codes.npy),
held-out recall@10 (text-like and in-distribution) and the p50/p99 of one text-like query at a time through the
served engine (FAISS on one thread). Prints JSON (one object per row), then a table.

    bench_ram.py [--n 60000] [--dim 512] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k
from clip_hpc.bench.heldout import VectorQueriesOnly, heldout_mixture_params, heldout_queries
from clip_hpc.devdata.synthetic_vectors import gaussian_mixture, write_emb_dir
from clip_hpc.index.build import build_index
from clip_hpc.index.choose import choose_index_key
from clip_hpc.index.memory import estimate_ram, format_size
from clip_hpc.index.summary import RESIDENT_FILES
from clip_hpc.search.engine import SearchEngine

QUERY_SEED = 9091  # as bench_index.py: neither the data's seed nor the self-check's stream


def budgets(n: int, rows: int, dim: int) -> dict[str, int]:
    """The largest budget each tier code fits (SQ4, PQ) and the least without one, for the auto key."""
    key = choose_index_key(n, dim)
    out = {}
    for code in ("SQ4", "PQ", None):
        estimate = estimate_ram(key, n, dim, tier_code=code, n_rows=rows)
        assert estimate is not None
        out[code or "none"] = estimate.total
    return out


def served(index_dir: Path, vectors: np.ndarray, queries: dict[str, np.ndarray]) -> dict:
    """Recall@10 per family and the latency of one text-like query at a time, through the served engine."""
    exact = {name: exact_top_k(q, vectors, 10) for name, q in queries.items()}
    engine = SearchEngine(index_dir, encoder=VectorQueriesOnly(vectors.shape[1]))
    try:
        out: dict = {}
        for name, q in queries.items():
            found = np.array([[h.id for h in row] for row in engine.search_vectors(q, 10)])
            out[f"recall_{name}"] = round(recall_at_k(found, exact[name], 10), 4)
        times = []
        for q in queries["text_like"][:200]:
            start = time.perf_counter()
            engine.search_vectors(q[None, :], 10)
            times.append((time.perf_counter() - start) * 1e3)
        out["p50_ms"], out["p99_ms"] = round(float(np.median(times)), 2), round(float(np.percentile(times, 99)), 2)
        return out
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-ram-"))
    p = heldout_mixture_params(args.n, 1)
    vectors, labels = gaussian_mixture(args.n, args.dim, p.clusters, latent=p.latent, spread=p.spread, noise=p.noise)
    write_emb_dir(work / "emb", vectors, labels, 20_000)
    vectors = vectors.astype(np.float16).astype(np.float32)
    sets = heldout_queries(vectors, 200, QUERY_SEED)
    queries = {"text_like": np.concatenate(sets["text_like"]), "in_distribution": sets["in_distribution"]}
    faiss.omp_set_num_threads(1)
    rows = []
    for name, budget in budgets(args.n, args.n, args.dim).items():
        out = work / f"index-{name}"
        info = build_index(work / "emb", out, progress=False, max_ram=budget)
        resident = sum((out / f).stat().st_size for f in RESIDENT_FILES if (out / f).exists())
        row = {
            "budget": name,
            "max_ram": budget,
            "ram_bytes": resident,
            "within": resident <= budget,
            "tier_planned_bytes": info.recall.get("tier_code_bytes"),
            "tier_kept": (info.tier or {}).get("key"),
            "ram_bytes_per_vector": info.ram_bytes_per_vector,
            "disk_bytes_per_vector": info.disk_bytes_per_vector,
            "nprobe": info.nprobe,
            "refine_factor": info.refine_factor,
            **served(out, vectors, queries),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "| budget | --max-ram | RAM resident | within | tier (planned B → kept) | RAM / disk B/vector | "
        "recall@10 text-like / in-dist | p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['budget']} | {format_size(r['max_ram'])} | {format_size(r['ram_bytes'])} | {r['within']} | "
            f"{r['tier_planned_bytes']} → {r['tier_kept']} | "
            f"{r['ram_bytes_per_vector']} / {r['disk_bytes_per_vector']} | "
            f"{r['recall_text_like']} / {r['recall_in_distribution']} | {r['p50_ms']} / {r['p99_ms']} |"
        )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
