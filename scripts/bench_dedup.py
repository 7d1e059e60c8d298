#!/usr/bin/env python
"""Benchmark `clip-hpc dedup` against exact all-pairs search: wall time and peak memory (max RSS of the process).

bench_dedup.py --sizes 50000 1000000 --exact-sizes 50000 [--threshold 0.95] [--work DIR] [--json F] [--markdown F]
bench_dedup.py --real SET_DIR [SET_DIR ...] --sizes [--threshold 0.9]     real CLIP image embeddings, each against exact

A real set is a folder with images.npy (`clip_hpc.bench.real_sets`, as for bench_index.py --real), kept outside
the project; every row is deduplicated and compared with exact all-pairs search.

Each size is an EMB_DIR of synthetic clustered 512-d vectors (float16 shards, one cluster per 1000 vectors) with 5%
planted near-duplicates (clip_hpc.devdata.near_duplicates). Both methods run in a child process of their own, and
so does the data generation: a child's peak RSS starts from its parent's.
At the exact sizes the two results are compared: dedup's groups must be the connected components of the exact pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clip_hpc.devdata.near_duplicates import with_near_duplicates
from clip_hpc.devdata.synthetic_vectors import write_emb_dir

BIN = Path(sys.executable).parent
DIM = 512
SHARD_SIZE = 50_000
POINTS_PER_CLUSTER = 1000  # the same density at every size: 1M vectors are 1000 clusters, as synthetic_vectors' default


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Wall seconds, CPU seconds (user + system: what a shared machine's load does not inflate) and peak RSS (MiB)
    of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}{err}")
    return {
        "seconds": round(wall, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "stdout": out.strip(),
    }


def make_emb_dir(n: int | Path, root: Path) -> Path:
    """`n` synthetic vectors, or a real set's folder, as an EMB_DIR under `root` (made once, then reused); in a child
    process, so this one stays small: a child's peak RSS starts from its parent's at the fork."""
    name, child = (n.name, "--make-real-child") if isinstance(n, Path) else (str(n), "--make-child")
    emb = root / f"emb-{name}"
    if not (emb / "inputs.txt").exists():
        subprocess.run([sys.executable, __file__, child, str(n), str(emb)], check=True)
    return emb


def make_child(n: int, emb: str) -> None:
    vectors, labels = with_near_duplicates(n, DIM, clusters=max(10, n // POINTS_PER_CLUSTER), seed=0)
    write_emb_dir(Path(emb), vectors, labels, SHARD_SIZE)


def make_real_child(folder: str, emb: str) -> None:
    """A real set's image rows as an EMB_DIR (its row order; one label, as the rows carry none)."""
    from clip_hpc.bench.real_sets import load_real_set

    images = load_real_set(folder).images
    write_emb_dir(Path(emb), images, np.zeros(len(images), np.int64), SHARD_SIZE)


def exact_child(emb_dir: str, threshold: float, out: str) -> None:
    """All pairs >= threshold of the whole EMB_DIR in float32 blocks (`pairs_above` with every row a primary)."""
    from clip_hpc.formats.emb_dir import EmbDir
    from clip_hpc.subsets.dedup_core import pairs_above

    shards = list(EmbDir(emb_dir).iter_shards())
    vectors = np.concatenate([s.embeddings for s in shards])
    ids = np.concatenate([s.ids for s in shards])
    pairs = pairs_above(vectors, ids, len(ids), threshold)
    np.savez(out, left=pairs.left, right=pairs.right)


def compare(exact_npz: Path, dedup_dir: Path) -> dict:
    """Pairs of the exact search whose ends dedup grouped together, and whether the groups are the same."""
    import pyarrow.parquet as pq

    from clip_hpc.subsets.dedup_core import Pairs, group_duplicates

    with np.load(exact_npz) as f:
        left, right = f["left"], f["right"]
    table = pq.read_table(dedup_dir / "duplicates.parquet").to_pydict()
    root = dict(zip(table["id"], table["duplicate_of"]))
    found = sum(root.get(int(a), int(a)) == root.get(int(b), int(b)) for a, b in zip(left, right))
    exact = group_duplicates(Pairs(left, right, np.zeros(len(left), np.float32)))
    same = np.array_equal(exact.ids, table["id"]) and np.array_equal(exact.kept, table["duplicate_of"])
    return {"exact_pairs": len(left), "pair_recall": round(found / max(1, len(left)), 5), "same_groups": bool(same)}


def bench_size(n: int | Path, exact: bool, args: argparse.Namespace) -> dict:
    """One synthetic size, or one real set's folder."""
    emb = make_emb_dir(n, args.work)
    name = n.name if isinstance(n, Path) else str(n)
    out = args.work / f"dedup-{name}"
    shutil.rmtree(out, ignore_errors=True)
    threads = {"OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    command = [str(BIN / "clip-hpc"), "dedup", str(emb), "--threshold", str(args.threshold), "--out", str(out)]
    command += ["--border", args.border]
    row: dict = {"set": name, "dedup": run_measured(command, threads)}
    record = json.loads((out / "dedup.json").read_text())
    row["n"] = record["counts"]["vectors"]
    row["dedup"].update(counts=record["counts"], partitioning=record["partitioning"], timings=record["timings"])
    if exact:
        npz = args.work / f"exact-{name}.npz"
        cmd = [sys.executable, __file__, "--exact-child", str(emb), str(npz), "--threshold", str(args.threshold)]
        row["exact"] = run_measured(cmd, threads)
        row["agreement"] = compare(npz, out)
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], machine: str) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        "| set | vectors | method | wall s | CPU s | peak RSS MiB | pairs >= S | duplicates | groups | partitions | "
        "memberships per vector | margin / exact margin | agreement with exact |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        d, c, p = row["dedup"], row["dedup"]["counts"], row["dedup"]["partitioning"]
        agree = row.get("agreement")
        verdict = f"pair recall {agree['pair_recall']}, same groups: {agree['same_groups']}" if agree else ""
        lines.append(
            f"| {row.get('set', '')} | {row['n']:,} | dedup | {d['seconds']} | {d['cpu_seconds']} "
            f"| {d['peak_rss_mib']} | {c['pairs']:,} "
            f"| {c['duplicates']:,} "
            f"| {c['groups']:,} | {p['count']} | {p['replication']} "
            f"| {p['margin']:.3f} / {p.get('exact_margin') or p['margin']:.3f} | {verdict} |"
        )
        if "exact" in row:
            e = row["exact"]
            lines.append(
                f"| {row.get('set', '')} | {row['n']:,} | exact all-pairs | {e['seconds']} | {e['cpu_seconds']} "
                f"| {e['peak_rss_mib']} | "
                f"{agree['exact_pairs']:,} | | | | | | |"
            )
    return "\n".join(lines) + "\n"


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line), cpu
        )
    return f"{cpu}, {os.cpu_count()} CPUs, {threads} BLAS/FAISS thread(s) per process"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[50_000, 1_000_000])
    parser.add_argument("--real", type=Path, nargs="*", default=[], help="real set folders (images.npy), each exact")
    parser.add_argument("--exact-sizes", type=int, nargs="*", default=[50_000])
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--border", choices=["auto", "exact"], default="auto", help="dedup's --border")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS/FAISS threads per process")
    parser.add_argument("--work", type=Path, default=Path("bench-dedup"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--exact-child", nargs=2, metavar=("EMB_DIR", "OUT_NPZ"), help=argparse.SUPPRESS)
    parser.add_argument("--make-child", nargs=2, metavar=("N", "EMB_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--make-real-child", nargs=2, metavar=("SET_DIR", "EMB_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_child:
        make_child(int(args.make_child[0]), args.make_child[1])
        return
    if args.make_real_child:
        make_real_child(*args.make_real_child)
        return
    if args.exact_child:
        exact_child(args.exact_child[0], args.threshold, args.exact_child[1])
        return
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(args.sizes) | set(args.exact_sizes)) if args.sizes or not args.real else []
    rows = [bench_size(n, n in args.exact_sizes, args) for n in sizes]
    rows += [bench_size(folder, True, args) for folder in args.real]
    result = {
        "threshold": args.threshold,
        "border": args.border,
        "dim": DIM,
        "machine": machine(args.threads),
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, result["machine"])
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
