#!/usr/bin/env python3
"""Sustained load on a real `clip-hpc serve` on 127.0.0.1: 32 clients mixing text, image-upload and by-id queries
for 60 s while 200 slow-loris connections dribble never-ending headers. Reports requests, errors, p50/p99 per kind
and the server's RSS before and after. Prints JSON, then a table.

    python scripts/bench_load.py [--index INDEX_DIR] [--clients 32] [--seconds 60] [--slowloris 200] [--json F]

Without --index it builds one first (500 sample images, the tiny model with random weights, in a temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from clip_hpc.client.process import serve_child
from clip_hpc.devdata.load_bench import format_table, run_load
from clip_hpc.devdata.sample_images import write_samples
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.formats.metadata import MetadataStore

BIN = Path(sys.executable).parent


def build_index(work: Path, n_images: int) -> Path:
    write_samples(work / "images", n_images)
    model = ["--model", "clip-hpc-tiny", "--pretrained", "none"]
    subprocess.run(
        [str(BIN / "clip-hpc"), "embed", str(work / "images"), "--out", str(work / "emb"), *model, "--workers", "0"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [str(BIN / "clip-hpc"), "index", str(work / "emb"), "--out", str(work / "index"), "--quiet"],
        check=True,
        capture_output=True,
    )
    return work / "index"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=Path, help="INDEX_DIR to serve (default: build a small one)")
    p.add_argument("--images", type=int, default=500, help="images for the index built without --index")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--slowloris", type=int, default=200)
    p.add_argument("--json", type=Path, help="also write the JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        index = args.index or build_index(work, args.images)
        with MetadataStore(IndexDir(index).meta_path, readonly=True) as meta:
            ids = meta.all_ids()
        with serve_child(index, work) as server:
            result = run_load(
                server.endpoint,
                server_pid=server.proc.pid,
                ids=ids,
                clients=args.clients,
                seconds=args.seconds,
                slowloris=args.slowloris,
            )
        summary = result.summary()
        summary["machine"] = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(),
            "index_vectors": len(ids),
            "server_log_bytes": (work / "serve.log").stat().st_size,
        }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print(format_table(summary))
    return 0 if summary["kinds"]["all"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
