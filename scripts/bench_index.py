#!/usr/bin/env python
"""Index benchmark: IVF-PQ with refine, IVF-PQ alone, exact FAISS flat and numpy brute force (the seeds' method)
on synthetic clustered 512-d vectors. Prints JSON (one object per size and method), then a Markdown table.

    bench_index.py [--sizes 100000,1000000] [--dim 512] [--queries 200] [--batch 256] [--work DIR]

Recall@10 is measured against exact search for off-distribution queries (a stand-in for text queries).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

import os
import subprocess
import sys

from clip_hpc.heldout import VectorQueriesOnly, evaluate, heldout_queries
from clip_hpc.index import build_index
from clip_hpc.recall import exact_top_k, off_distribution_queries, recall_at_k
from clip_hpc.search import SearchEngine
from clip_hpc.synthetic_vectors import gaussian_mixture, write_emb_dir

Search = Callable[[np.ndarray, int], np.ndarray]  # queries, k -> ids


def latency_ms(search: Search, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    times = []
    for q in queries:
        start = time.perf_counter()
        search(q[None, :], k)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput_qps(search: Search, queries: np.ndarray, batch: int, k: int = 10) -> float:
    start = time.perf_counter()
    for lo in range(0, len(queries), batch):
        search(queries[lo:lo + batch], k)
    return len(queries) / (time.perf_counter() - start)


def measure(name: str, search: Search, queries: np.ndarray, exact: np.ndarray, batch: int, **extra: object) -> dict:
    p50, p99 = latency_ms(search, queries)
    return {"method": name, **extra, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
            "batched_qps": round(throughput_qps(search, queries, batch), 1),
            "recall_at_10": round(recall_at_k(search(queries, 10), exact, 10), 4)}


def bench_size(n: int, dim: int, n_queries: int, batch: int, work: Path) -> list[dict]:
    vectors, labels = gaussian_mixture(n, dim, clusters=max(100, n // 200), seed=1)
    emb = write_emb_dir(work / f"emb-{n}", vectors, labels, shard_size=100_000)
    vectors = vectors.astype(np.float16).astype(np.float32)  # what the shards (and vectors.npy) hold
    rng = np.random.default_rng(7)
    queries = off_distribution_queries(vectors[rng.choice(n, n_queries, replace=False)], rng)
    exact = exact_top_k(queries, vectors, 10)
    info = build_index(emb, work / f"index-{n}", progress=False)
    size = {"n": n, "dim": dim}
    build = {"train_s": info.timings["train_s"], "add_s": info.timings["add_s"]}
    rows = []
    for refine in (True, False):
        engine = SearchEngine(work / f"index-{n}", refine=refine)

        def ann(q: np.ndarray, k: int, engine: SearchEngine = engine) -> np.ndarray:
            return np.array([[h.id for h in row] for row in engine.search_vectors(q, k)])

        rows.append(measure(f"{info.index_key} nprobe={info.nprobe}" + (" + refine" if refine else ""),
                            ann, queries, exact, batch, **size, **build,
                            bytes_per_vector=info.bytes_per_vector))
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    flat_add = time.perf_counter() - start
    rows.append(measure("FAISS Flat (exact)", lambda q, k: flat.search(q, k)[1], queries, exact, batch, **size,
                        train_s=0.0, add_s=round(flat_add, 3), bytes_per_vector=4 * dim))

    def brute(q: np.ndarray, k: int) -> np.ndarray:
        scores = q @ vectors.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)

    rows.append(measure("numpy brute force", brute, queries, exact, batch, **size, train_s=0.0, add_s=0.0,
                        bytes_per_vector=4 * dim))
    return rows


BIN = Path(sys.executable).parent


def bench_ranks(emb: Path, n: int, work: Path) -> list[dict]:
    """`mpiexec -n R clip-hpc index` for R = 1 and 2, one after the other: build time by phase (index.json),
    B/vector, and held-out recall (text-like and in-distribution) from clip_hpc.heldout."""
    rows = []
    for ranks in (1, 2):
        out = work / f"index-{n}-r{ranks}"
        subprocess.run([str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "clip-hpc"), "index", str(emb),
                        "--out", str(out), "--quiet"], check=True, capture_output=True, env={**os.environ})
        info = json.loads((out / "index.json").read_text())
        held = evaluate(out)
        t = info["timings"]
        engine = SearchEngine(out, encoder=VectorQueriesOnly(info["dim"]))
        queries = np.concatenate(heldout_queries(engine.vectors, 100, 11)["text_like"])
        p50, p99 = latency_ms(lambda q, k: engine.search_vectors(q, k), queries)
        engine.close()
        rows.append({"n": n, "method": f"clip-hpc {ranks} rank(s) {info['index_key']} nprobe={info['nprobe']} "
                                       f"refine x{info['refine_factor']}",
                     **{k: t.get(k, 0.0) for k in ("vectors_s", "train_s", "add_s", "merge_s", "recall_s",
                                                  "total_s")},
                     "bytes_per_vector": info["bytes_per_vector"], "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                     "recall_text_like": held["text_like"],
                     "recall_in_distribution": held["in_distribution"], "claimed": held["claimed"]})
    return rows


def bench_autofaiss(vectors: np.ndarray, n: int, work: Path) -> dict:
    """autofaiss.build_index on the same vectors (its own key and nprobe choice), scored on held-out queries."""
    try:
        from autofaiss import build_index as autofaiss_build
    except ImportError as exc:
        return {"n": n, "method": f"autofaiss (missing: {exc})"}
    start = time.perf_counter()
    index, _ = autofaiss_build(embeddings=vectors, save_on_disk=False, metric_type="ip", verbose=40,
                               max_index_memory_usage="2G", current_memory_available="6G")
    total = time.perf_counter() - start
    if index is None:
        return {"n": n, "method": "autofaiss (build_index returned no index: see its log)"}
    faiss.write_index(index, str(work / "autofaiss.faiss"))
    sets = heldout_queries(vectors, 400, 2024)
    recall = {}
    for name, q in (("in_distribution", sets["in_distribution"]), ("text_like", np.concatenate(sets["text_like"]))):
        recall[name] = recall_at_k(index.search(q, 10)[1], exact_top_k(q, vectors, 10), 10)
    p50, _ = latency_ms(lambda q, k: index.search(q, k)[1], sets["in_distribution"][:200])
    return {"n": n, "method": f"autofaiss {index.__class__.__name__}", "total_s": round(total, 2),
            "bytes_per_vector": round((work / "autofaiss.faiss").stat().st_size / n, 2), "p50_ms": round(p50, 3),
            "recall_text_like": round(recall["text_like"], 4), "recall_in_distribution": round(recall["in_distribution"], 4)}


def scale_table(rows: list[dict]) -> str:
    head = ("| N | method | vectors s | train s | add s | merge s | self-check s | total s | B/vector | p50 ms "
            "| recall text-like | recall in-dist |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        cells = [f"{r['n']:,}", r["method"]] + [str(r.get(k, "")) for k in (
            "vectors_s", "train_s", "add_s", "merge_s", "recall_s", "total_s", "bytes_per_vector", "p50_ms",
            "recall_text_like", "recall_in_distribution")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = "| N | method | train s | add s | bytes/vector | p50 ms | p99 ms | batched QPS | recall@10 |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['method']} | {r['train_s']:.1f} | {r['add_s']:.1f} | {r['bytes_per_vector']} "
                     f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['batched_qps']:,.0f} | {r['recall_at_10']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--scale", action="store_true",
                    help="instead: 1 vs 2 mpiexec ranks by phase, held-out recall, and autofaiss, per size")
    args = ap.parse_args()
    if args.scale:
        return main_scale(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-index-"))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            for row in bench_size(n, args.dim, args.queries, args.batch, work):
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()} threads, "
          f"faiss {faiss.__version__}; off-distribution queries, k=10\n")
    print(table(rows))


def main_scale(args: argparse.Namespace) -> None:
    from clip_hpc.heldout import heldout_mixture_params

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-index-"))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            params = heldout_mixture_params(n, 1)
            vectors, labels = gaussian_mixture(n, args.dim, params.clusters, latent=params.latent,
                                               spread=params.spread, noise=params.noise, seed=1)
            emb = write_emb_dir(work / f"emb-{n}", vectors, labels, shard_size=50_000)
            del labels
            for row in bench_ranks(emb, n, work):
                print(json.dumps(row), flush=True)
                rows.append(row)
            rows.append(bench_autofaiss(vectors.astype(np.float16).astype(np.float32), n, work))
            print(json.dumps(rows[-1]), flush=True)
            del vectors
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"faiss {faiss.__version__}; held-out queries (clip_hpc.heldout), k=10\n")
    print(scale_table(rows))


if __name__ == "__main__":
    main()
