#!/usr/bin/env python3
"""The pieces of `clip-hpc filter`'s CPU scan, each against reading the same float16 shards, in one process:
interleaved rounds, best of each, as wall and as CPU time of the calling thread (other jobs on a shared machine
stretch the wall time, much less the CPU time). Every variant scores the same shards with the same queries.

    python scripts/bench_filter_kernels.py EMB_DIR [--queries 16] [--shards 2] [--rounds 8]

EMB_DIR: any complete EMB_DIR of float16 shards (e.g. the one scripts/bench_filter.py makes, or
scripts/make_synthetic_vectors.py's). Prints a JSON document, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS on one thread like torch (set before numpy loads)

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clip_hpc.formats.shard_columns import read_scan_columns  # noqa: E402
from clip_hpc.formats.span_read import scratch  # noqa: E402
from clip_hpc.subsets.scan import read_ahead  # noqa: E402
from clip_hpc.subsets.scoring import score_rows  # noqa: E402


def before(embeddings: np.ndarray, queries: np.ndarray, rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The scan as it was (commit 2adb143): every product kept in an (n, queries) array, then numpy's max and argmax."""
    source = torch.from_numpy(embeddings)
    out = torch.empty((len(embeddings), len(queries)))
    transposed, buffer = torch.from_numpy(queries).T.contiguous(), torch.empty((rows, embeddings.shape[1]))
    for lo in range(0, len(source), rows):
        block = source[lo : lo + rows]
        buffer[: len(block)].copy_(block)
        torch.matmul(buffer[: len(block)], transposed, out=out[lo : lo + len(block)])
    products = out.numpy()
    return products.max(axis=1), products.argmax(axis=1)


def blocks(embeddings: np.ndarray, rows: int, step: Callable[[torch.Tensor], object]) -> None:
    """`step` on each block converted to float32 (one reused buffer)."""
    source, buffer = torch.from_numpy(embeddings), torch.empty((rows, embeddings.shape[1]))
    for lo in range(0, len(source), rows):
        block = source[lo : lo + rows]
        buffer[: len(block)].copy_(block)
        step(buffer[: len(block)])


def variants(shards: list[Path], stored: list[np.ndarray], queries: np.ndarray) -> dict[str, Callable[[], object]]:
    import faiss

    faiss.omp_set_num_threads(1)
    flat = faiss.IndexFlatIP(queries.shape[1])
    flat.add(queries)  # type: ignore[call-arg]  # faiss has no stubs
    transposed, none = torch.from_numpy(queries).T.contiguous(), np.zeros((0, queries.shape[1]), np.float32)
    spare = scratch(stored[0].nbytes)  # the uint8 buffer the scan reads a shard into

    def each(fn: Callable[[np.ndarray], object]) -> Callable[[], None]:
        return lambda: [fn(e) for e in stored] and None

    def h5py_whole() -> None:
        for path in shards:
            with h5py.File(path, "r") as f:
                f["embeddings"][...]

    return {
        "read: h5py whole dataset (the I/O limit)": h5py_whole,
        "read: scan, new array per shard": lambda: [read_scan_columns(p) for p in shards] and None,
        "read: scan, into a reused buffer": lambda: [read_scan_columns(p, spare) for p in shards] and None,
        "score: before (2,048 rows, numpy max)": each(lambda e: before(e, queries)),
        **{f"score: now, {b:,}-row blocks": each(_at_block(b, queries, none)) for b in (256, 512, 1024, 2048, 4096)},
        "score: now, 2 torch threads": each(_threads(2, queries, none)),
        "part: float16->float32 only (torch)": each(lambda e: blocks(e, 1024, lambda b: None)),
        "part: float16->float32 only (numpy)": each(_numpy_conversion),
        "part: products only (torch.mm)": each(lambda e: blocks(e, 1024, lambda b: torch.mm(b, transposed))),
        "alt: queries @ block.T (torch)": each(lambda e: blocks(e, 1024, lambda b: torch.from_numpy(queries) @ b.T)),
        "alt: numpy BLAS products (np.dot)": each(lambda e: blocks(e, 1024, lambda b: np.dot(b.numpy(), queries.T))),
        "alt: faiss IndexFlatIP(queries) k=1": each(lambda e: blocks(e, 1024, lambda b: flat.search(b.numpy(), 1))),  # type: ignore[call-arg]  # faiss has no stubs
        "alt: bfloat16 conversion + products + max": each(_bfloat16(queries)),
        "pipeline: read ahead + score (scan_unit's loop)": lambda: [
            score_rows(c.embeddings, queries, none) for _, c in read_ahead([str(p) for p in shards])
        ]
        and None,
    }  # fmt: skip


def _bfloat16(queries: np.ndarray) -> Callable[[np.ndarray], object]:
    """A bfloat16 pre-filter's cost (AVX512-BF16 products): blocks converted to bfloat16, multiplied, maxima."""
    transposed = torch.from_numpy(queries).T.contiguous().bfloat16()

    def run(e: np.ndarray) -> None:
        source, buffer = torch.from_numpy(e), torch.empty((1024, e.shape[1]), dtype=torch.bfloat16)
        for lo in range(0, len(source), 1024):
            block = source[lo : lo + 1024]
            buffer[: len(block)].copy_(block)
            torch.mm(buffer[: len(block)], transposed).amax(dim=1)

    return run


def _numpy_conversion(e: np.ndarray) -> None:
    for lo in range(0, len(e), 1024):
        e[lo : lo + 1024].astype(np.float32)


def _at_block(rows: int, queries: np.ndarray, none: np.ndarray) -> Callable[[np.ndarray], object]:
    import clip_hpc.subsets.scoring as scoring

    def run(e: np.ndarray) -> object:
        kept, scoring.CPU_BLOCK_ROWS = scoring.CPU_BLOCK_ROWS, rows
        try:
            return score_rows(e, queries, none)
        finally:
            scoring.CPU_BLOCK_ROWS = kept

    return run


def _threads(n: int, queries: np.ndarray, none: np.ndarray) -> Callable[[np.ndarray], object]:
    def run(e: np.ndarray) -> object:
        torch.set_num_threads(n)
        try:
            return score_rows(e, queries, none)
        finally:
            torch.set_num_threads(1)

    return run


def measure(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Best wall and thread-CPU seconds of each case over interleaved rounds."""
    best = {k: (np.inf, np.inf) for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            w, c = time.perf_counter() - w0, time.thread_time() - c0
            best[name] = (min(best[name][0], w), min(best[name][1], c))
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("emb_dir", type=Path)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shards = sorted((args.emb_dir / "shards").glob("shard-*.h5"))[: args.shards]
    stored = [read_scan_columns(p).embeddings for p in shards]
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, stored[0].shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    n = sum(len(e) for e in stored)
    best = measure(variants(shards, stored, queries), args.rounds)
    limit_wall, limit_cpu = best["read: h5py whole dataset (the I/O limit)"]
    rows = [
        {"case": k, "wall_vectors_per_s": n / w, "cpu_vectors_per_s": n / c, "wall_ratio": limit_wall / w,
         "cpu_ratio": limit_cpu / c}
        for k, (w, c) in best.items()
    ]  # fmt: skip
    print(json.dumps({"vectors": n, "dim": stored[0].shape[1], "queries": args.queries, "rows": rows}, indent=2))
    print("| case | wall M vec/s | CPU M vec/s | / read (wall) | / read (CPU) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['wall_vectors_per_s'] / 1e6:.2f} | {r['cpu_vectors_per_s'] / 1e6:.2f} "
            f"| {r['wall_ratio']:.2f} | {r['cpu_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
