#!/usr/bin/env python3
"""`clip-hpc filter`'s exact scan rate against the I/O limit: the rate of only reading the same float16 shards
(h5py, whole `embeddings` datasets), side by side in one run, on 1 and (with --ranks 1,2) 2 MPI ranks. Both read
from the page cache (a warm-up read comes first), so the limit is the machine's, not the disk's. Prints a JSON
document, then a markdown table.

    python scripts/bench_filter.py [-n 1000000] [--dim 512] [--queries 16] [--shard-size 50000] [--ranks 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

from clip_hpc.devdata.synthetic_vectors import gaussian_mixture, write_emb_dir
from clip_hpc.formats.emb_dir import EmbDir

BIN = Path(sys.executable).parent
MODEL = {512: "ViT-B-32", 128: "clip-hpc-tiny"}  # a model of each dimension, random weights: queries need no download
READ_ONLY = """
import sys, time, h5py
from pathlib import Path
from clip_hpc.cluster.collective import wait_for_all
from clip_hpc.cluster.world import world
w = world()
shards = sorted(Path(sys.argv[1]).glob("shard-*.h5"))
mine = [p for p in shards if int(p.stem.split("-")[1]) % w.size == w.rank]
wait_for_all(w)
t0, rows = time.perf_counter(), 0
for path in mine:
    with h5py.File(path, "r") as f:
        rows += len(f["embeddings"][...])
seconds = w.gather((rows, time.perf_counter() - t0))
if w.is_root:
    print("BENCH", sum(r for r, _ in seconds) / max(s for _, s in seconds))
"""


def make_source(root: Path, n: int, dim: int, shard_size: int) -> Path:
    vectors, labels = gaussian_mixture(n, dim, clusters=100, seed=0)
    emb = write_emb_dir(root / "emb", vectors, labels, shard_size, model=MODEL[dim], pretrained="none")
    manifest = EmbDir(emb).write_manifest(-(-n // shard_size), shard_size)
    assert manifest is not None
    return emb


def read_rate(emb: Path, ranks: int) -> float:
    """Vectors per second of only reading every shard's embeddings, split across `ranks` like the scan is."""
    proc = subprocess.run(
        [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-c", READ_ONLY, str(emb / "shards")],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(proc.stdout.split("BENCH")[1])


def filter_rate(emb: Path, out: Path, ranks: int, queries: int, threshold: float) -> dict:
    """One fresh `clip-hpc filter` under mpiexec with `queries` text queries; its own scan rate from filter.json."""
    texts = [a for i in range(queries) for a in ("--text", f"a photo of thing number {i}")]
    t0 = time.perf_counter()
    subprocess.run(
        [str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "clip-hpc"), "filter", str(emb), "--out", str(out),
         *texts, "--threshold", str(threshold), "--quiet", "--device", "cpu"],
        check=True,
    )  # fmt: skip
    report = json.loads((out / "filter.json").read_text())
    return {
        "scan_vectors_per_s": report["timings"]["scan_vectors_per_s"],
        "scan_s": report["timings"]["scan_s"],
        "kept": report["counts"]["kept"],
        "wall_s": time.perf_counter() - t0,
    }


def warm(emb: Path) -> None:
    for path in sorted((emb / "shards").glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            f["embeddings"][...]


def table(rows: list[dict]) -> str:
    lines = [
        "| ranks | queries | vectors | read only (vec/s) | filter scan (vec/s) | filter / read |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['queries']} | {r['n']:,} | {r['read_vectors_per_s']:,.0f} | "
            f"{r['scan_vectors_per_s']:,.0f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512, choices=sorted(MODEL))
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=50_000)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--threshold", type=float, default=0.2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        t0 = time.perf_counter()
        emb = make_source(Path(tmp), args.n, args.dim, args.shard_size)
        made = time.perf_counter() - t0
        warm(emb)
        rows = []
        for ranks in map(int, args.ranks.split(",")):
            read = read_rate(emb, ranks)
            scan = filter_rate(emb, Path(tmp) / f"out-{ranks}", ranks, args.queries, args.threshold)
            rows.append(
                {"ranks": ranks, "queries": args.queries, "n": args.n, "dim": args.dim, "read_vectors_per_s": read,
                 **scan, "ratio": scan["scan_vectors_per_s"] / read}
            )  # fmt: skip
    doc = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "source_s": made,
        "rows": rows,
    }
    print(json.dumps(doc, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
