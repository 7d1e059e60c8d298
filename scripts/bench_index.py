#!/usr/bin/env python
"""Index benchmark on held-out synthetic data: `clip-hpc index` with 1 and 2 mpiexec ranks side by side (build time
by phase, bytes per vector in RAM and on disk, latency, recall, exact rows read per query), the same index without
refine, optionally other `--index-key`s (the previous default), exact FAISS flat, and autofaiss `build_index` on
the same vectors at its default memory budget and at ours. Prints JSON (one object per row), then a table.

    bench_index.py [--sizes 500000,1000000] [--seeds 3,1] [--ranks 1] [--keys OPQ32,IVF2048,PQ32]
                   [--no-autofaiss] [--work DIR]
    bench_index.py --real DIR [--real DIR2] [--json OUT.json] [--image-queries 1000] [--text-queries 1000]
                   [--graph-candidate]

--real DIR: a folder of real embeddings (images.npy, optional texts.npy and pairs.npy; clip_hpc.bench.real_sets),
kept outside the project. Held-out images and captions no build sees; the default index (built as `clip-hpc index`
builds it) against exact IndexFlatIP, interleaved in this process at 1 and default FAISS threads
(clip_hpc.bench.real_bench).

The data is clip_hpc.bench.heldout's mixture with drawn parameters (cluster count, spread, latent rank, noise); the
queries are its text-like groups (cosine 0.25-0.45 to their image, gap directions tilted into the data) and
perturbed indexed vectors, drawn from a seed no build or self-check uses. Recall@10 is against exact search on the
float16 vectors the index holds. autofaiss is installed for the benchmark only (`make setup` adds it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np

from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k
from clip_hpc.bench.heldout import VectorQueriesOnly, heldout_mixture_params, heldout_queries
from clip_hpc.bench.real_bench import real_table, run_real_bench
from clip_hpc.devdata.synthetic_vectors import gaussian_mixture, write_emb_dir
from clip_hpc.search.engine import SearchEngine

BIN = Path(sys.executable).parent
AUTOFAISS_DEFAULT_BUDGET = "16G"  # autofaiss build_index's own defaults: max_index_memory_usage 16G of 32G
QUERY_SEED = 9091  # neither the data's seed nor the self-check's stream, nor 4049 (issue 24 chose the codes on it)
PHASES = ("listing_s", "vectors_s", "train_s", "tier_train_s", "add_s", "merge_s", "recall_s", "total_s")
ROW_BYTES = 2  # vectors.npy holds float16 rows: what an exact re-rank reads, per dimension
Search = Callable[[np.ndarray, int], np.ndarray]  # queries, k -> ids


class Queries:
    """Held-out text-like and in-distribution queries with their exact top 10."""

    def __init__(self, vectors: np.ndarray, n_queries: int = 400) -> None:
        sets = heldout_queries(vectors, n_queries, QUERY_SEED)
        self.families = {"text_like": np.concatenate(sets["text_like"]), "in_distribution": sets["in_distribution"]}
        self.exact = {name: exact_top_k(q, vectors, 10) for name, q in self.families.items()}

    def score(self, search: Search) -> dict:
        """p50/p99 of one text-like query at a time (200 of them), and recall@10 per family."""
        times = []
        for q in self.families["text_like"][:200]:
            start = time.perf_counter()
            search(q[None, :], 10)
            times.append((time.perf_counter() - start) * 1e3)
        return {
            "p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3),
            **{
                f"recall_{name}": round(recall_at_k(search(q, 10), self.exact[name], 10), 4)
                for name, q in self.families.items()
            },
        }


def engine_search(engine: SearchEngine) -> Search:
    return lambda q, k: np.array([[h.id for h in row] for row in engine.search_vectors(q, k)])


def bench_clip_hpc(
    emb: Path, out: Path, ranks: int, queries: Queries, key: str = "auto", serve_factors: Sequence[int] = ()
) -> list[dict]:
    """`mpiexec -n ranks clip-hpc index`: its phases from index.json, then its served recall (and, at one rank,
    the same index without refine)."""
    tier = ["--rerank-tier", "off"] if key != "auto" else []  # another key: the single-tier configuration
    subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            str(ranks),
            str(BIN / "clip-hpc"),
            "index",
            str(emb),
            "--out",
            str(out),
            "--quiet",
            "--index-key",
            key,
            *tier,
        ],
        check=True,
        capture_output=True,
        env={**os.environ},
    )
    info = json.loads((out / "index.json").read_text())
    name = f"clip-hpc, {ranks} rank{'s' * (ranks > 1)}: {info['index_key']} nprobe {info['nprobe']}"
    if key != "auto":
        name += " (--index-key, --rerank-tier off)"
    disk = round((out / "vectors.npy").stat().st_size / info["n"], 1)
    common = {
        **{k: info["timings"].get(k, 0.0) for k in PHASES},
        "bytes_per_vector": info["bytes_per_vector"],
        "self_check_share": round(info["timings"].get("recall_s", 0) / info["timings"]["total_s"], 3),
        "sweep_budget_hit": info["recall"].get("sweep_budget_hit"),
    }
    rows = []
    served = [(True, None)] + ([(True, f) for f in serve_factors] + [(False, None)] if ranks == 1 else [])
    for refine, factor in served:
        engine = SearchEngine(out, encoder=VectorQueriesOnly(info["dim"]), refine=refine, refine_factor=factor)
        try:
            tier = info.get("tier") if refine else None
            label = f"{name}, refine x{engine.refine_factor}" if refine else f"{name}, no refine"
            if factor:
                label = f"the same index served at refine x{factor} (search-time)"
            if tier:
                label += f", {tier['key']} tier ({tier['code_bytes']} B) -> exact x{tier['exact_factor']}"
            exact_rows = 10 * (tier["exact_factor"] if tier else engine.refine_factor) if refine else 0
            ram = info["bytes_per_vector"] + (tier["code_bytes"] * info["n_rows"] / info["n"] if tier else 0)
            rows.append(
                {
                    "method": label,
                    **common,
                    "exact_rows": exact_rows,
                    "ram_bytes_per_vector": round(ram, 1),
                    "vectors_npy_bytes_per_vector": disk if refine else 0,
                    **queries.score(engine_search(engine)),
                    **({"claimed": info["recall"].get("served")} if refine and not factor else {}),
                }
            )
        finally:
            engine.close()
    return rows


def bench_flat(vectors: np.ndarray, queries: Queries) -> dict:
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return {
        "method": "FAISS Flat (exact)",
        "add_s": round(time.perf_counter() - start, 2),
        "bytes_per_vector": 4 * vectors.shape[1],
        "ram_bytes_per_vector": 4 * vectors.shape[1],
        "exact_rows": 0,
        **queries.score(lambda q, k: flat.search(q, k)[1]),
    }


def bench_autofaiss(
    vectors: np.ndarray, budget_bytes: int | None, work: Path, queries: Queries, timeout_s: float
) -> dict:
    """autofaiss in a child process (a crash there is a row saying so, not the end of the run), at its default
    memory budget (None: 16G, where it chooses HNSW) or at `budget_bytes` (our index's size: a code of our class)."""
    npy, out = work / "autofaiss-input.npy", work / "autofaiss.faiss"
    np.save(npy, vectors)
    budget = AUTOFAISS_DEFAULT_BUDGET if budget_bytes is None else f"{max(1, budget_bytes // 2**20)}M"
    start = time.perf_counter()
    try:
        child = subprocess.run(
            [sys.executable, __file__, "--autofaiss-child", str(npy), str(out), budget],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"method": f"autofaiss (budget {budget}) did not finish within {timeout_s:.0f} s", "total_s": timeout_s}
    finally:
        npy.unlink()
    total = round(time.perf_counter() - start, 1)
    if child.returncode != 0 or not out.exists():
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {"method": f"autofaiss (budget {budget}) failed, exit {child.returncode}: {tail}", "total_s": total}
    index = faiss.read_index(str(out))
    chosen = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        "method": f"autofaiss (budget {budget}): {chosen.get('index_key')} {chosen.get('index_param', '')}",
        "total_s": total,
        "bytes_per_vector": round(out.stat().st_size / len(vectors), 2),
        "exact_rows": 0,
        "ram_bytes_per_vector": round(out.stat().st_size / len(vectors), 2),
        **queries.score(lambda q, k: index.search(q, k)[1]),
    }


def autofaiss_child(npy: str, out: str, budget: str) -> None:
    from autofaiss import build_index

    plain_opq = faiss.OPQMatrix  # autofaiss 2.18 calls OPQMatrix(d, M=, d2=); faiss 1.15 takes them positionally only
    faiss.OPQMatrix = lambda d=0, M=1, d2=-1: plain_opq(d, M, d2)

    memory = (
        {}
        if budget == AUTOFAISS_DEFAULT_BUDGET
        else {"max_index_memory_usage": budget, "current_memory_available": "8G"}
    )
    index, info = build_index(embeddings=np.load(npy), save_on_disk=False, metric_type="ip", verbose=40, **memory)
    faiss.write_index(index, out)
    print(json.dumps({k: str(v) for k, v in (info or {}).items()}))


def bench_size(n: int, seed: int, args: argparse.Namespace, work: Path) -> list[dict]:
    params = heldout_mixture_params(n, seed)
    vectors, labels = gaussian_mixture(
        n, args.dim, params.clusters, latent=params.latent, spread=params.spread, noise=params.noise, seed=seed
    )
    shutil.rmtree(work / f"emb-{n}", ignore_errors=True)
    emb = write_emb_dir(work / f"emb-{n}", vectors, labels, shard_size=50_000)
    del labels
    vectors = vectors.astype(np.float16).astype(np.float32)  # what the shards (and vectors.npy) hold
    queries = Queries(vectors)
    rows = []
    for ranks in args.ranks:
        rows += bench_clip_hpc(
            emb, _fresh(work / f"index-{n}-r{ranks}"), ranks, queries, serve_factors=args.serve_factors
        )
    for i, key in enumerate(args.keys):
        rows += bench_clip_hpc(emb, _fresh(work / f"index-{n}-k{i}"), 1, queries, key)
    rows.append(bench_flat(vectors, queries))
    if args.autofaiss:
        budget = int(rows[0]["bytes_per_vector"] * n) + 2**20
        for row in (
            bench_autofaiss(vectors, None, work, queries, args.autofaiss_timeout),
            bench_autofaiss(vectors, budget, work, queries, args.autofaiss_timeout),
        ):
            row["vs_clip_hpc_build"] = round(rows[0]["total_s"] / row["total_s"], 3)
            rows.append(row)
    return [
        {
            "n": n,
            "data": f"seed {seed}: clusters {params.clusters}, spread {params.spread}, latent "
            f"{params.latent}, noise {params.noise}",
            **row,
        }
        for row in rows
    ]


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def table(rows: list[dict]) -> str:
    keys = (
        *PHASES,
        "bytes_per_vector",
        "ram_bytes_per_vector",
        "vectors_npy_bytes_per_vector",
        "exact_rows",
        "p50_ms",
        "p99_ms",
        "recall_text_like",
        "recall_in_distribution",
    )
    head = (
        "| N | data | method | listing s | vectors s | train s | tier s | add s | merge s | self-check s | total s "
        "| index B/vector | RAM B/vector (index + tier) | vectors.npy B/vector | exact rows/query | p50 ms | p99 ms "
        "| recall text-like | recall in-dist |"
    )
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join([f"{r['n']:,}", r["data"].split(":")[0], r["method"], *(str(r.get(k, "")) for k in keys)])
            + " |"
        )
    return "\n".join(lines)


def bench_real(args: argparse.Namespace) -> None:
    """--real: each set's default index against exact search; JSON to --json (when given), tables printed."""
    results = []
    for folder in args.real:
        with tempfile.TemporaryDirectory(prefix="bench-real-", dir=args.work) as work:
            result = run_real_bench(
                folder,
                Path(work),
                image_queries=args.image_queries,
                text_queries=args.text_queries,
                timed=args.timed,
                graph_candidate=args.graph_candidate,
            )
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}")
    for result in results:
        print("\n" + real_table(result))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--autofaiss-child":
        return autofaiss_child(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500000,1000000")
    ap.add_argument("--ranks", default="1")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seeds", default="3,1", help="mixture seeds (parameters drawn from each): 3 easy, 1 hard")
    ap.add_argument(
        "--keys",
        default="",
        help="other --index-key values to build beside auto (without the tier), "
        "';'-separated, e.g. the previous default OPQ32,IVF2048,PQ32",
    )
    ap.add_argument("--serve-factors", default="", help="also serve the one-rank index at these refine factors")
    ap.add_argument("--no-autofaiss", dest="autofaiss", action="store_false")
    ap.add_argument("--autofaiss-timeout", type=float, default=3600.0, help="seconds autofaiss may take per size")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--real", type=Path, action="append", default=[], help="a real embedding set folder (repeatable)")
    ap.add_argument("--json", type=Path, default=None, help="--real: write the results here as JSON")
    ap.add_argument("--image-queries", type=int, default=1000, help="--real: held-out images (never indexed)")
    ap.add_argument("--text-queries", type=int, default=1000, help="--real: held-out caption (or text-like) queries")
    ap.add_argument("--timed", type=int, default=400, help="--real: queries timed one at a time, per method")
    ap.add_argument("--graph-candidate", action="store_true", help="--real: build with index --graph-candidate")
    args = ap.parse_args()
    if args.real:
        return bench_real(args)
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    args.keys = [k for k in args.keys.split(";") if k]
    args.serve_factors = [int(f) for f in args.serve_factors.split(",") if f]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-index-"))
    rows = []
    try:
        for n, seed in ((int(n), int(s)) for n in args.sizes.split(",") for s in args.seeds.split(",")):
            for row in bench_size(n, seed, args, work):
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss "
        f"{faiss.__version__}; held-out queries (clip_hpc.bench.heldout), k=10\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
