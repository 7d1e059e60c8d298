#!/usr/bin/env python3
"""Serving latency and throughput, old design against new, side by side in one run: a real `clip-hpc serve` on
127.0.0.1 over a 100k-vector index (synthetic vectors recorded as ViT-B-32 with random weights; time does not
depend on the weights), with 1, 8 and 32 concurrent clients sending distinct (cache-miss) text queries.

- old: `clip-hpc serve --no-batching --full-context` (each query encoded alone at the 77-token context);
- new: the defaults (exact short-context text encoding, micro-batched encoding and FAISS search).
Also timed in the same run: the raw encoder floor (one full-context batch-1 text encode, and the short one), and
checked: the served query vector and top-10 ids for a text equal the full-context encoder's. Prints JSON, then a
table. Both designs have Nagle off (the socket fix is not switchable).

    python scripts/bench_serve.py [--n 100000] [--model ViT-B-32] [--clients 1,8,32] [--requests 160] [--rounds 400]
        [--max-requests 3200] [--soak-s 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from clip_hpc.bench.serve_load import DIMS, TOKEN, build, load, query_texts, served_equals_full_context
from clip_hpc.client.process import serve_child

DESIGNS = {"old": ["--no-batching", "--full-context"], "new": []}


class EncoderFloor:
    """Batch-1 text encodes in this process, full context (the floor the old design cannot beat) and short, timed
    in rounds between the server runs (other jobs share the cores): the figure is the median over all rounds."""

    def __init__(self, model: str) -> None:
        from dataclasses import replace

        from clip_hpc.model.loading import load_model
        from clip_hpc.server.threads import use_job_cpus

        use_job_cpus()  # the threads the server uses
        self.short = load_model(model, "none", device="cpu")
        self.full = replace(self.short, text_context=replace(self.short.text_context, short=False))
        self.times: dict[str, list[float]] = {"full": [], "short": []}
        self.rounds: dict[str, list[float]] = {"full": [], "short": []}

    def measure(self, texts: list[str]) -> None:
        for name, loaded in (("full", self.full), ("short", self.short)):
            loaded.encode_text(["warm up"])
            times = []
            for text in texts:
                t0 = time.perf_counter()
                loaded.encode_text([text])
                times.append(time.perf_counter() - t0)
            self.times[name] += times
            self.rounds[name].append(round(float(np.median(times)) * 1000, 1))

    def summary(self) -> dict:
        out: dict = {"text_context": self.short.text_context.describe()}
        for name in ("full", "short"):
            out[f"encode_{name}_b1_ms"] = round(float(np.median(self.times[name])) * 1000, 1)
            out[f"encode_{name}_b1_round_medians_ms"] = self.rounds[name]
        return out


def batch_sizes(url: str) -> dict[str, tuple[float, float]]:
    """(items, batches) so far per micro-batch stage, from /metrics."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False).text
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for field, slot in (("clip_hpc_batch_size_sum", 0), ("clip_hpc_batch_size_count", 1)):
            if line.startswith(field + "{"):
                stage = line.split('stage="')[1].split('"')[0]
                out.setdefault(stage, [0.0, 0.0])[slot] = float(line.rsplit(" ", 1)[1])
    return {stage: (items, batches) for stage, (items, batches) in out.items()}


def mean_batch(before: dict, after: dict) -> dict[str, float]:
    return {
        stage: round((items - before.get(stage, (0, 0))[0]) / max(1.0, batches - before.get(stage, (0, 0))[1]), 2)
        for stage, (items, batches) in after.items()
        if stage in ("text-search", "text", "search")
    }


def run_design(index: Path, tmp: Path, name: str, args: argparse.Namespace, floor_model) -> tuple[list[dict], dict]:
    rows, extra = [], {}
    with serve_child(index, tmp, "--port", "0", *DESIGNS[name], name=name, env={"CLIP_HPC_TOKEN": TOKEN}) as child:
        url = child.endpoint.base_url
        asyncio.run(load(url, 4, query_texts(16, seed=999)))  # warm: threads, connections, caches
        for clients in args.clients:
            texts = query_texts(requests_for(clients, args), seed=clients)
            before = batch_sizes(url)
            row = asyncio.run(load(url, clients, texts))
            rows.append({"design": name, **row, "mean_batch": mean_batch(before, batch_sizes(url))})
        if name == "new":
            extra["correctness"] = served_equals_full_context(url, index, floor_model, query_texts(10, seed=12345))
            if args.soak_s:
                extra["soak"] = {
                    "design": name,
                    **asyncio.run(load(url, max(args.clients), query_texts(20_000, seed=7), args.soak_s)),
                }
    return rows, extra


def requests_for(clients: int, args: argparse.Namespace) -> int:
    """`--rounds` rounds' worth (up to `--max-requests`): the queries of a batch finish together, so over 320
    requests the 8-client p99 was the single slowest of 40 rounds; over 3200 it is the 4th slowest of 400."""
    return max(args.requests, min(args.max_requests, clients * args.rounds))


def ratios(rows: list[dict], floor: dict) -> dict:
    by = {(r["design"], r["clients"]): r for r in rows}
    out = {}
    if ("new", 1) in by:
        out["new_1_client_p50_over_full_b1_encode"] = round(by["new", 1]["p50_ms"] / floor["encode_full_b1_ms"], 2)
    if ("new", 8) in by and ("old", 8) in by:
        out["new_over_old_qps_8_clients"] = round(by["new", 8]["qps"] / by["old", 8]["qps"], 2)
    if ("new", 8) in by and ("new", 1) in by:
        out["new_8_client_p99_over_new_1_client_p50"] = round(by["new", 8]["p99_ms"] / by["new", 1]["p50_ms"], 2)
    return out


def table(result: dict) -> str:
    f = result["floor"]
    lines = [
        f"Machine: {result['machine']}",
        f"Index: {result['n']} vectors, {result['index']}",
        f"Encoder floor ({result['model']}, batch 1): full context {f['encode_full_b1_ms']} ms, "
        f"short context {f['encode_short_b1_ms']} ms ({f['text_context']})",
        "",
        f"  (medians of the rounds between server runs: full {f['encode_full_b1_round_medians_ms']}, "
        f"short {f['encode_short_b1_round_medians_ms']})",
        "",
        "| design | clients | requests | errors | p50 ms | p99 ms | queries/s | mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"] + ([result["soak"]] if "soak" in result else []):
        label = "old (--no-batching --full-context)" if r["design"] == "old" else "new (defaults)"
        soak = f" ({r['wall_s']}s)" if r is result.get("soak") else ""
        lines.append(
            f"| {label} | {r['clients']}{soak} | "
            f"{r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | {r['qps']} | "
            f"{', '.join(f'{k} {v}' for k, v in r.get('mean_batch', {}).items() if v) or '-'} |"
        )
    lines += [
        "",
        "Ratios: " + ", ".join(f"{k} = {v}" for k, v in result["ratios"].items()),
        "Served = full-context encoder: " + json.dumps(result.get("correctness")),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--model", default="ViT-B-32", choices=sorted(DIMS))
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=160, help="distinct requests per concurrency level, at least")
    parser.add_argument("--rounds", type=int, default=400, help="and at least this many times the clients ...")
    parser.add_argument("--max-requests", type=int, default=3200, help="... up to this many")
    parser.add_argument("--soak-s", type=float, default=60.0, help="then the new design at the most clients this long")
    parser.add_argument("--designs", default="old,new")
    parser.add_argument("--index-key", default="auto")
    parser.add_argument("--new-switches", default="", help="extra `clip-hpc serve` switches for the new design")
    args = parser.parse_args()
    DESIGNS["new"] = args.new_switches.split()
    args.clients = [int(c) for c in args.clients.split(",")]
    import torch

    from clip_hpc.server.threads import this_job_cpus

    machine = (
        f"{platform.processor() or platform.machine()}, {this_job_cpus()} CPUs for the job "
        f"({os.cpu_count()} on the node), torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        index, index_info = build(Path(tmp), args.model, args.n, args.index_key)
        floor = EncoderFloor(args.model)
        floor_texts = query_texts(20, seed=4242)
        floor.measure(floor_texts)
        result: dict = {
            "machine": machine,
            "model": args.model,
            "n": args.n,
            "index": f"{index_info['index_key']} (nprobe {index_info['nprobe']}, refine "
            f"{index_info['refine']}, built in {index_info['build_s']} s)",
            "results": [],
        }
        for name in args.designs.split(","):
            rows, extra = run_design(index, Path(tmp), name, args, floor.full)
            result["results"] += rows
            result.update(extra)
            floor.measure(floor_texts)
    result["floor"] = floor.summary()
    result["ratios"] = ratios(result["results"], result["floor"])
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
