"""The serving benchmark's shared pieces (scripts/bench_serve.py, scripts/gpu_check.py): a synthetic index, distinct
query texts, an HTTP/1.1 load generator and the served-equals-full-context check."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np

from clip_hpc.devdata.synthetic_vectors import gaussian_mixture, write_emb_dir

DIMS = {"clip-hpc-tiny": 128, "clip-hpc-demo": 128, "ViT-B-32": 512}
TOKEN = "bench-" + "t" * 32
WORDS = (
    "red blue green small large old new wooden metal striped shiny dark bright cat dog car house tree boat "
    "bird flower mountain river street city beach table chair lamp bicycle horse train window garden night "
    "morning snow rain sunset portrait close-up aerial view painting photo sketch of a the in on with near"
).split()


SENT: set[str] = set()  # every text this run has sent: no server sees a text twice, so every query is a cache miss


def query_texts(n: int, seed: int) -> list[str]:
    """`n` texts of 2 to 14 words (lengths vary like real queries: 4 to 16 tokens with the start and end tokens),
    none sent before in this run."""
    rng, out = random.Random(seed), list[str]()
    while len(out) < n:
        text = " ".join(rng.choices(WORDS, k=rng.randint(2, 14)))
        if text not in SENT:
            SENT.add(text)
            out.append(text)
    return out


def build(tmp: Path, model: str, n: int, index_key: str) -> tuple[Path, dict]:
    from clip_hpc.index.build import build_index

    vectors, labels = gaussian_mixture(n, DIMS[model], clusters=max(10, n // 100))
    emb = write_emb_dir(tmp / "emb", vectors, labels, shard_size=50_000, model=model, pretrained="none")
    t0 = time.perf_counter()
    info = build_index(emb, tmp / "index", index_key=index_key, progress=False)
    return tmp / "index", {
        "index_key": info.index_key,
        "nprobe": info.nprobe,
        "refine": info.refine,
        "build_s": round(time.perf_counter() - t0, 1),
    }


async def load(url: str, clients: int, texts: list[str], duration_s: float = 0.0) -> dict:
    """`clients` workers send the texts in turn (each once), for at most `duration_s` if given; one keep-alive
    connection per worker. Latency per request, throughput over the whole run.

    The workers speak HTTP/1.1 over asyncio streams themselves (a GET with Content-Length answers is all they need)
    rather than through httpx: the clients share the server's cores here, where on a cluster they sit on laptops,
    and httpx's ~1.1 ms of CPU a request delayed each round of 8 by ~8 ms (README, serving under load)."""
    parts = urllib.parse.urlsplit(url)
    latencies: list[float] = []
    errors = 0
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            for i in counter:
                if i >= len(texts) or (duration_s and time.perf_counter() > stop_at):
                    return
                query = urllib.parse.urlencode({"q": texts[i], "k": 10})
                t0 = time.perf_counter()
                writer.write(
                    f"GET /api/search?{query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                    f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
                )
                status, body = await read_response(reader)
                errors += status != 200 or "results" not in json.loads(body)
                latencies.append(time.perf_counter() - t0)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "qps": round(len(latencies) / wall, 1),
    }


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length (every JSON answer of the server has one)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
    return int(head[0].split(" ", 2)[1]), await reader.readexactly(int(headers["content-length"]))


def served_equals_full_context(url: str, index: Path, full_model, texts: list[str]) -> dict:
    """The served query vector and top-10 ids against the full-context encoder's vector searched in-process."""
    from clip_hpc.search.engine import SearchEngine

    engine = SearchEngine(index, encoder=None)
    worst, same_ids = 0.0, True
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False, timeout=60) as c:
            for text in texts:
                served = c.post("/api/search", json={"text": text, "k": 10, "return_vector": True}).json()
                reference = full_model.encode_text([text])
                worst = max(worst, float(np.abs(np.asarray(served["query_vector"]) - reference[0]).max()))
                local = engine.search_vectors(reference, 10)[0]
                same_ids &= [h["id"] for h in served["results"]] == [h.id for h in local]
    finally:
        engine.close()
    return {"texts": len(texts), "max_abs_vector_diff": worst, "same_top10_ids": bool(same_ids)}
