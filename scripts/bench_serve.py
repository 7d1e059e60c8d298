#!/usr/bin/env python3
"""Server latency and throughput: text queries against a real `clip-hpc serve` on 127.0.0.1, with 1, 8 and 32
concurrent clients, on a 100k-vector index (synthetic vectors, indexed by index.py), per model (random weights).

Every query text is distinct, so the text-embedding cache never answers: these are cold-query figures. One extra
row per model repeats a single query (cache hits), to show what the cache saves. Prints JSON, then a table.

    python scripts/bench_serve.py [--n 100000] [--models clip-hpc-tiny,ViT-B-32] [--clients 1,8,32] [--requests 200]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from clip_hpc.client.process import stop_server, wait_for_server
from clip_hpc.synthetic_vectors import gaussian_mixture, write_emb_dir

BIN = Path(sys.executable).parent

DIMS = {"clip-hpc-tiny": 128, "ViT-B-32": 512}
TOKEN = "bench-" + "t" * 32


def build(tmp: Path, model: str, n: int, index_key: str) -> tuple[Path, dict]:
    """Synthetic shards recorded as `model` with random weights, so that serve loads that model for text."""
    from clip_hpc.index import build_index

    vectors, labels = gaussian_mixture(n, DIMS[model], clusters=max(10, n // 100))
    emb = write_emb_dir(tmp / f"emb-{model}", vectors, labels, shard_size=50_000, model=model, pretrained="none")
    t0 = time.perf_counter()
    info = build_index(emb, tmp / f"index-{model}", index_key=index_key, progress=False)
    return tmp / f"index-{model}", {"index_key": info.index_key, "nprobe": info.nprobe,
                                    "refine": info.refine, "build_s": round(time.perf_counter() - t0, 1)}


class Server:
    """`clip-hpc serve INDEX --port 0`, ready when /health answers; stopped by its own pid."""

    def __init__(self, index: Path, workdir: Path) -> None:
        self.conn = workdir / f"{index.name}.json"
        self.log = open(workdir / f"{index.name}.log", "w")
        self.proc = subprocess.Popen([str(BIN / "clip-hpc"), "serve", str(index), "--port", "0", "--connection-file",
                                      str(self.conn)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "CLIP_HPC_TOKEN": TOKEN})
        self.url = wait_for_server(self.conn, self.proc, timeout=300).base_url

    def stop(self) -> None:
        stop_server(self.proc, timeout=30)
        self.log.close()


async def load(url: str, clients: int, requests: int, texts: list[str]) -> dict:
    """`clients` workers share `requests` queries; latency per request, throughput over the whole run."""
    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in queue:
            t0 = time.perf_counter()
            resp = await client.get("/api/search", params={"q": texts[i % len(texts)], "k": 10})
            latencies.append(time.perf_counter() - t0)
            errors += resp.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120, trust_env=False) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "errors": errors, "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "qps": round(requests / wall, 1)}


def bench_model(tmp: Path, model: str, args: argparse.Namespace) -> list[dict]:
    index, info = build(tmp, model, args.n, args.index_key)
    server = Server(index, tmp)
    rows = []
    try:
        asyncio.run(load(server.url, 4, 20, [f"warm up {i}" for i in range(20)]))
        for clients in args.clients:
            texts = [f"a photo of object {clients}-{i} on a table" for i in range(args.requests)]
            rows.append({"model": model, "cache": "cold", **info, **asyncio.run(load(server.url, clients, args.requests,
                                                                                   texts))})
        rows.append({"model": model, "cache": "hit", **info,
                     **asyncio.run(load(server.url, max(args.clients), args.requests, ["one repeated query"]))})
    finally:
        server.stop()
    return rows


def table(rows: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| model | index | queries | clients | p50 ms | p99 ms | queries/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['index_key']} (nprobe {r['nprobe']}) | "
                     f"{'distinct (cache miss)' if r['cache'] == 'cold' else 'repeated (cache hit)'} | "
                     f"{r['clients']} | {r['p50_ms']} | {r['p99_ms']} | {r['qps']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--models", default="clip-hpc-tiny,ViT-B-32")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--index-key", default="auto")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    import torch

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads), {'CUDA' if torch.cuda.is_available() else 'no GPU'}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for model in args.models.split(","):
            rows += bench_model(Path(tmp), model, args)
    print(json.dumps({"machine": machine, "n": args.n, "results": rows}, indent=2))
    print(table(rows, machine))


if __name__ == "__main__":
    main()
