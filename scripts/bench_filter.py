#!/usr/bin/env python3
"""`clip-hpc filter`'s exact scan rate against the I/O limit: the rate of only reading the same float16 shards
(the scan's own reader, `subsets.scan.read_ahead`, with nothing scored), side by side in one run, on 1 and (with
--ranks 1,2) 2 MPI ranks, `--repeat` times each, alternating (the machine is shared: compare the ratios). Both
read from the page cache (a warm-up read comes first), so the limit is the machine's memory, not the disk's. With
`--cold` the shards' pages are evicted (fsync, then posix_fadvise DONTNEED) before every read-only and every filter
run, so both read from the disk: the I/O limit of a job whose shards do not fit in the node's page cache (every
filter over a large collection); the read-only runs then start reading as long after the eviction as the filter's
scan does (see scan_rows). Each filter run is set against the mean of the two read-only runs around it.
`--page-cache use,bypass` runs every case with each way of reading (`clip-hpc filter --page-cache`), the read-only
runs reading the same way: through the page cache, or what it lacks straight from the disk. Prints a JSON document,
then markdown tables.

With `--clip-retrieval DIR` (a folder holding the clip_retrieval package, e.g. from `pip install --no-deps --target
DIR clip-retrieval clip-anytorch`; "" for the environment's) it also runs clip-retrieval's `filter` beside ours on the
same vectors: `clip-hpc export` writes its layout, its own `clip_index` builds the index with autofaiss, and its
`clip_filter` runs with one text query and a threshold; its recall against our exact set is reported. Its model
(`clip.load("ViT-B/32")`) is a download, so the child stands a stub in for the `clip` module that returns our query
vector (see CLIP_RETRIEVAL); nothing else of its code is changed. Skipped, saying why, when it is not importable.

    python scripts/bench_filter.py [-n 1000000] [--dim 512] [--queries 16] [--shard-size 50000] [--ranks 1,2]
        [--repeat 3] [--cold] [--page-cache use,bypass] [--baseline DIR] [--clip-retrieval DIR --cr-keep 2000]

`--baseline DIR`: another version's package, e.g. `git archive 2adb143 clip_hpc | tar -x -C DIR`, filtered in each
round beside this one (old against new on the same shards, the same load).
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

import numpy as np

from clip_hpc.bench.filter_rates import evict, make_filter_source, warm

BIN = Path(sys.executable).parent
MODEL = {512: "ViT-B-32", 128: "clip-hpc-tiny"}  # a model of each dimension, random weights: queries need no download
READ_ONLY = """
import sys, time
from pathlib import Path
from clip_hpc.cluster.collective import wait_for_all
from clip_hpc.subsets.scan import read_ahead
from clip_hpc.cluster.world import world
w = world()
shards = sorted(Path(sys.argv[1]).glob("shard-*.h5"))
mine = [p for p in shards if int(p.stem.split("-")[1]) % w.size == w.rank]
time.sleep(float(sys.argv[2]))  # as long after the eviction as the filter's scan starts (see scan_rows)
wait_for_all(w)
t0, rows = time.perf_counter(), 0
for _, columns in read_ahead([str(p) for p in mine], None, sys.argv[3] == "bypass"):  # the scan's reader alone
    rows += len(columns.embeddings)
seconds = w.gather((rows, time.perf_counter() - t0))
if w.is_root:
    print("BENCH", sum(r for r, _ in seconds) / max(s for _, s in seconds))
"""

CLIP_RETRIEVAL = """
import contextlib, importlib.util, io, json, sys, time, types
import numpy as np
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])
mode, export, index_dir = sys.argv[2:5]
spec = importlib.util.find_spec("clip_retrieval")  # its __init__ imports the server and inference (flask, ...):
package = types.ModuleType("clip_retrieval")  # the package is entered without it, its modules run unchanged
package.__path__ = list(spec.submodule_search_locations) if spec else []
sys.modules["clip_retrieval"] = package
if mode == "import":
    import clip_retrieval.clip_filter, clip_retrieval.clip_index
    raise SystemExit(0)
if mode == "index":
    from clip_retrieval.clip_index import clip_index
    default = json.JSONEncoder.default  # autofaiss (pinned to numpy<2) writes numpy 2's float32 into its json
    json.JSONEncoder.default = lambda self, o: o.item() if isinstance(o, np.generic) else default(self, o)
    t0 = time.perf_counter()
    clip_index(export, index_dir)
    print("BENCH", json.dumps({"seconds": time.perf_counter() - t0}))
    raise SystemExit(0)
import faiss, torch
query, threshold, out = np.load(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
class Model:  # clip.load("ViT-B/32") downloads OpenAI's weights: this stands in, giving clip-hpc's query vector
    def encode_text(self, tokens):
        return torch.from_numpy(query.copy())
stub = types.ModuleType("clip")
stub.load = lambda *args, **kwargs: (Model(), None)
stub.tokenize = lambda texts: torch.zeros((len(texts), 77), dtype=torch.long)
sys.modules["clip"] = stub
found = {}
class Recording:  # clip_filter copies the files it finds and prints their urls: this keeps the labels it got
    def __init__(self, index):
        self.index = index
    def range_search(self, x, radius):
        lims, d, i = self.index.range_search(x, radius)
        found["labels"] = i
        return lims, d, i
read_index = faiss.read_index
faiss.read_index = lambda path, *args: Recording(read_index(path, *args))
from clip_retrieval.clip_filter import clip_filter
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    clip_filter("a text query", out, index_dir, threshold=threshold)
seconds = time.perf_counter() - t0
np.save(out + "/labels.npy", found["labels"])
print("BENCH", json.dumps({"seconds": seconds, "index": read_index(index_dir + "/image.index").__class__.__name__}))
"""


def make_source(root: Path, n: int, dim: int, shard_size: int) -> Path:
    return make_filter_source(root, n, dim, shard_size, MODEL[dim])


def read_rate(emb: Path, ranks: int, settle: float = 0.0, page_cache: str = "use") -> float:
    """Vectors per second of only reading every shard's embeddings, split across `ranks` like the scan is, the
    read starting `settle` seconds after the process does, through the page cache or ("bypass") around it."""
    proc = subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            str(ranks),
            sys.executable,
            "-c",
            READ_ONLY,
            str(emb / "shards"),
            str(settle),
            page_cache,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(proc.stdout.split("BENCH")[1])


def run_filter(
    emb: Path, out: Path, ranks: int, texts: list[str], threshold: float, code: str | None = None, page_cache: str = ""
) -> dict:
    """One fresh `clip-hpc filter` under mpiexec with these text queries; its timings and counts from filter.json.
    `code`: a folder holding another version's clip_hpc package, run instead of this one (first on PYTHONPATH).
    `page_cache`: its --page-cache ("": the default, the only choice a version from before the option has)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    subprocess.run(
        [str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "clip-hpc"), "filter", str(emb), "--out", str(out),
         *[a for t in texts for a in ("--text", t)], "--threshold", repr(threshold), "--quiet", "--device", "cpu",
         *(["--page-cache", page_cache] if page_cache else [])],
        check=True, env=env if code else None,
    )  # fmt: skip
    report = json.loads((out / "filter.json").read_text())
    return {
        "scan_vectors_per_s": report["timings"]["scan_vectors_per_s"],
        "scan_s": report["timings"]["scan_s"],
        "plan_s": report["timings"]["plan_s"],  # the model loaded and the queries encoded
        "total_s": report["timings"]["total_s"],
        "kept": report["counts"]["kept"],
        "wall_s": time.perf_counter() - t0,
    }


def scan_rows(emb: Path, tmp: Path, args: argparse.Namespace) -> list[dict]:
    """Read-only, filter, read-only again, `repeat` times for each number of ranks. The filter is set against the
    mean of the reads that bracket it: from the disk of a shared VM the read rate drifts 2x from run to run, and the
    two reads say by how much it moved while the filter ran (`read_spread`).

    With --cold each read-only run waits, after the eviction, as long as the filter's model load takes
    (`settle_s`, from an unrecorded first filter run) before it reads. This VM's balloon device reports free pages,
    so memory freed by the eviction goes back to the host within seconds, and a read that starts later refills the
    page cache from fresh host pages: 0.9-1.1 M vectors/s against 1.1-1.4 M starting at once, alternating
    (2026-12-07). Without the wait the filter, whose scan starts only once its model is loaded, was set against a
    read it could not have had."""
    texts = [f"a photo of thing number {i}" for i in range(args.queries)]
    before_each = evict if args.cold else warm
    settle = 0.0
    if args.cold:
        before_each(emb)
        settle = run_filter(emb, tmp / "out-settle", 1, texts, args.threshold)["plan_s"]
    rows = []
    cases = [(r, m, a) for r in map(int, args.ranks.split(",")) for a in range(args.repeat) for m in args.page_cache]
    for ranks, mode, attempt in cases:  # the ways of reading alternate within a repeat
        before_each(emb)
        read = read_rate(emb, ranks, settle, mode)
        before_each(emb)
        scan = run_filter(emb, tmp / f"out-{ranks}-{mode}-{attempt}", ranks, texts, args.threshold, None, mode)
        before_each(emb)
        after = read_rate(emb, ranks, settle, mode)
        mean = (read + after) / 2
        row = {"ranks": ranks, "cache": "cold" if args.cold else "warm", "page_cache": mode, "queries": args.queries,
               "n": args.n, "dim": args.dim, "settle_s": settle, "read_vectors_per_s": mean, "read_before": read,
               "read_after": after, "read_spread": abs(read - after) / mean, **scan,
               "ratio": scan["scan_vectors_per_s"] / mean}  # fmt: skip
        if args.baseline:
            out = tmp / f"baseline-{ranks}-{mode}-{attempt}"
            before_each(emb)
            rate = run_filter(emb, out, ranks, texts, args.threshold, args.baseline)["scan_vectors_per_s"]
            row |= {"baseline_scan_vectors_per_s": rate, "baseline_ratio": rate / mean}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    baseline = any("baseline_ratio" in r for r in rows)
    lines = [
        "| ranks | page cache | reads | queries | vectors | read only before / after (vec/s) | filter scan (vec/s) | "
        "filter / mean read |" + (" baseline scan (vec/s) | baseline / read |" if baseline else ""),
        "|---:|---|---|---:|---:|---|---:|---:|" + ("---:|---:|" if baseline else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['cache']} | {r['page_cache']} | {r['queries']} | {r['n']:,} | "
            f"{r['read_before']:,.0f} / "
            f"{r['read_after']:,.0f} | "
            f"{r['scan_vectors_per_s']:,.0f} | {r['ratio']:.2f} |"
            + (f" {r['baseline_scan_vectors_per_s']:,.0f} | {r['baseline_ratio']:.2f} |" if baseline else "")
        )
    return "\n".join(lines)


def clip_retrieval_child(where: str, *argv: str) -> dict:
    """One run of CLIP_RETRIEVAL in a child process; its BENCH line."""
    proc = subprocess.run(
        [sys.executable, "-c", CLIP_RETRIEVAL, where, *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"clip-retrieval {argv[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.split("BENCH")[1]) if "BENCH" in proc.stdout else {}


def exact_threshold(export: Path, query: np.ndarray, keep: int) -> float:
    """The exact score of the `keep`-th best row (float32 products of the float16 values) over the export's npy."""
    scores = np.concatenate(
        [np.load(f).astype(np.float32) @ query for f in sorted((export / "img_emb").glob("*.npy"), key=_number)]
    )
    return float(np.sort(scores)[-keep])


def _number(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def export_ids(export: Path) -> np.ndarray:
    """Our global id of each row of the export, in its order: what an index label built from it stands for."""
    import pyarrow.parquet as pq

    files = sorted((export / "metadata").glob("*.parquet"), key=_number)
    return np.concatenate([pq.read_table(f, columns=["id"])["id"].to_numpy() for f in files])


def versus_clip_retrieval(emb: Path, tmp: Path, args: argparse.Namespace) -> dict:
    """clip-retrieval's index (its clip_index: autofaiss over our export) and filter, beside our exact filter with
    the same query and threshold on 1 rank; its recall of our set and the rows it adds (approximate scores)."""
    import pyarrow.parquet as pq

    from clip_hpc.subsets.queries import encode_queries

    where = args.clip_retrieval
    try:
        clip_retrieval_child(where, "import", "", "")
    except RuntimeError as exc:
        return {"skipped": f"clip-retrieval is not importable ({exc}); pip install --no-deps --target DIR "
                           "clip-retrieval, then --clip-retrieval DIR"}  # fmt: skip
    export, index_dir, out = tmp / "export", tmp / "cr-index", tmp / "cr-out"
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "clip-hpc"), "export", str(emb), "--out", str(export)], check=True, capture_output=True)
    export_s = time.perf_counter() - t0
    index_dir.mkdir()
    t0 = time.perf_counter()
    clip_retrieval_child(where, "index", str(export), str(index_dir))
    index_s = time.perf_counter() - t0
    text = "a photo of thing number 0"
    query = encode_queries(MODEL[args.dim], "none", [text], [], [], device="cpu").positives
    np.save(tmp / "query.npy", query)
    threshold = exact_threshold(export, query[0], args.cr_keep)
    ours = run_filter(emb, tmp / "ours", 1, [text], threshold)
    out.mkdir()
    theirs = clip_retrieval_child(
        where, "filter", str(export), str(index_dir), str(tmp / "query.npy"), repr(threshold), str(out)
    )
    exact = set(pq.read_table(tmp / "ours" / "results.parquet", columns=["id"])["id"].to_pylist())
    found = set(export_ids(export)[np.load(out / "labels.npy")].tolist())
    return {
        "n": args.n, "threshold": threshold, "export_s": export_s, "clip_retrieval_index_s": index_s,
        "clip_retrieval_index": theirs.get("index"), "clip_retrieval_filter_s": theirs["seconds"],
        "ours_wall_s": ours["wall_s"], "ours_total_s": ours["total_s"], "ours_plan_s": ours["plan_s"],
        "ours_scan_s": ours["scan_s"], "ours_kept": len(exact),
        "clip_retrieval_found": len(found), "recall": len(found & exact) / max(1, len(exact)),
        "not_in_exact_set": len(found - exact),
    }  # fmt: skip


def cr_table(r: dict) -> str:
    if "skipped" in r:
        return f"clip-retrieval: skipped: {r['skipped']}"
    return "\n".join(
        [
            "| vectors | threshold | exact set | ours: total s (model+queries, scan) | clip-retrieval: index s "
            "| filter s | found "
            "| recall | not in exact set |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {r['n']:,} | {r['threshold']:.4f} | {r['ours_kept']:,} "
            f"| {r['ours_total_s']:.1f} ({r['ours_plan_s']:.1f}, {r['ours_scan_s']:.1f}) "
            f"| {r['clip_retrieval_index_s']:.1f} ({r['clip_retrieval_index']}) | {r['clip_retrieval_filter_s']:.1f} "
            f"| {r['clip_retrieval_found']:,} | {r['recall']:.3f} | {r['not_in_exact_set']:,} |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512, choices=sorted(MODEL))
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=50_000)
    ap.add_argument("--ranks", default="1,2", help="'' for none (only the clip-retrieval comparison)")
    ap.add_argument("--repeat", type=int, default=1, help="read-only and filter runs, alternating, per rank count")
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--cold", action="store_true", help="evict the shards from the page cache before every run")
    ap.add_argument(
        "--page-cache",
        type=lambda v: v.split(","),
        default=["use"],
        help="the filter's --page-cache choices to run, comma-separated (use, bypass); the read-only runs read alike",
    )
    ap.add_argument(
        "--baseline", metavar="DIR", help="also run the clip_hpc package in DIR (another version) each round"
    )
    ap.add_argument("--clip-retrieval", metavar="DIR", default=None, help="run clip-retrieval's filter beside ours")
    ap.add_argument("--cr-keep", type=int, default=2000, help="the comparison's threshold keeps this many exactly")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        t0 = time.perf_counter()
        emb = make_source(Path(tmp), args.n, args.dim, args.shard_size)
        made = time.perf_counter() - t0
        warm(emb)
        rows = scan_rows(emb, Path(tmp), args) if args.ranks else []
        cr = versus_clip_retrieval(emb, Path(tmp), args) if args.clip_retrieval is not None else None
    doc = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "source_s": made,
        "rows": rows,
        "clip_retrieval": cr,
    }
    print(json.dumps(doc, indent=2))
    print(table(rows))
    if cr is not None:
        print(cr_table(cr))


if __name__ == "__main__":
    main()
