"""Sustained load on a running server: N clients mixing text, image-upload and by-id queries for a while, plus
slow-loris connections that send a header line now and then and never finish. Counts requests and errors,
latency percentiles per kind, and the server's RSS before and after (read from /proc: run it on the node).

`scripts/bench_load.py` prints it as JSON and a table; `tests/test_load.py` runs a short version."""

from __future__ import annotations

import io
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from clip_hpc.client.endpoint import Endpoint
from clip_hpc.client.http_client import client_for

WORDS = (
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "star",
    "two",
    "small",
    "large",
    "on",
    "white",
    "dark",
    "photo",
    "drawing",
    "striped",
    "yellow",
    "triangle",
    "background",
)
KINDS = ("text", "upload", "by_id")


def rss_mb(pid: int) -> float:
    """Resident memory of a process on this machine, in MiB (0 when it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def upload_images(n: int = 8, seed: int = 0) -> list[bytes]:
    """Small PNGs of random colour blocks to upload (distinct, so no cache could answer)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        blocks = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(blocks).resize((160, 120), Image.Resampling.NEAREST).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@dataclass
class LoadResult:
    seconds: float
    clients: int
    slowloris: int
    requests: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    error_samples: list[str] = field(default_factory=list)
    slowloris_closed_by_server: int = 0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)) * 1000, 1) if values else None

        rows = {
            k: {
                "requests": self.requests[k],
                "errors": self.errors[k],
                "p50_ms": pct(self.latencies[k], 50),
                "p99_ms": pct(self.latencies[k], 99),
            }
            for k in KINDS
        }
        every = [x for k in KINDS for x in self.latencies[k]]
        rows["all"] = {
            "requests": sum(self.requests.values()),
            "errors": sum(self.errors.values()),
            "p50_ms": pct(every, 50),
            "p99_ms": pct(every, 99),
        }
        return {
            "seconds": self.seconds,
            "clients": self.clients,
            "slowloris": self.slowloris,
            "kinds": rows,
            "slowloris_closed_by_server": self.slowloris_closed_by_server,
            "rss_before_mb": round(self.rss_before_mb, 1),
            "rss_after_mb": round(self.rss_after_mb, 1),
            "error_samples": self.error_samples[:5],
        }


def _one_request(
    client: httpx.Client, kind: str, rng: random.Random, ids: Sequence[int], images: Sequence[bytes]
) -> httpx.Response:
    if kind == "text":
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + f" {rng.randint(0, 10**6)}"
        return client.get("/api/search", params={"q": text, "k": 10})
    if kind == "upload":
        return client.post(
            "/api/search/image", params={"k": 10}, files={"file": ("q.png", rng.choice(images), "image/png")}
        )
    return client.post("/api/search", json={"image_id": rng.choice(ids), "k": 10})


def _client_loop(
    endpoint: Endpoint,
    stop: threading.Event,
    result: LoadResult,
    lock: threading.Lock,
    seed: int,
    ids: Sequence[int],
    images: Sequence[bytes],
) -> None:
    rng = random.Random(seed)
    with client_for(endpoint, timeout=60) as client:
        while not stop.is_set():
            kind = rng.choice(KINDS)
            start = time.perf_counter()
            try:
                resp = _one_request(client, kind, rng, ids, images)
                ok, detail = resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text[:120]}"
            except httpx.HTTPError as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            took = time.perf_counter() - start
            with lock:
                result.requests[kind] += 1
                if ok:
                    result.latencies[kind].append(took)
                else:
                    result.errors[kind] += 1
                    result.error_samples.append(f"{kind}: {detail}")


def _slowloris(
    host: str, port: int, n: int, stop: threading.Event, result: LoadResult, lock: threading.Lock, drip_s: float = 2.0
) -> None:
    """Keep `n` connections that dribble header bytes and never end their headers; reopen what the server closes."""
    socks: list[socket.socket | None] = [None] * n
    while not stop.is_set():
        for i in range(n):
            sock = socks[i]
            try:
                if sock is None:
                    sock = socket.create_connection((host, port), timeout=5)
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
                    socks[i] = sock
                else:
                    sock.sendall(b"X-a: b\r\n")
            except OSError:
                if sock is not None:
                    sock.close()
                    with lock:
                        result.slowloris_closed_by_server += 1
                socks[i] = None
        stop.wait(drip_s)
    for sock in socks:
        if sock is not None:
            sock.close()


def run_load(
    endpoint: Endpoint,
    *,
    server_pid: int | None,
    ids: Sequence[int],
    clients: int = 32,
    seconds: float = 60.0,
    slowloris: int = 200,
    seed: int = 0,
) -> LoadResult:
    """Run the mixed load for `seconds`; the slow-loris connections start first and stay for the whole run."""
    result = LoadResult(seconds=seconds, clients=clients, slowloris=slowloris)
    result.rss_before_mb = rss_mb(server_pid) if server_pid else 0.0
    lock, stop = threading.Lock(), threading.Event()
    images = upload_images(seed=seed)
    threads = []
    if slowloris and endpoint.port:
        threads.append(
            threading.Thread(
                target=_slowloris, args=(endpoint.host, endpoint.port, slowloris, stop, result, lock), daemon=True
            )
        )
    threads += [
        threading.Thread(
            target=_client_loop, args=(endpoint, stop, result, lock, seed * 1000 + i, ids, images), daemon=True
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    result.rss_after_mb = rss_mb(server_pid) if server_pid else 0.0
    return result


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['clients']} clients, {summary['slowloris']} slow-loris connections, {summary['seconds']:g} s; "
        f"server RSS {summary['rss_before_mb']} -> {summary['rss_after_mb']} MiB; slow-loris connections "
        f"closed by the server: {summary['slowloris_closed_by_server']}",
        f"{'kind':8} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for kind, row in summary["kinds"].items():
        lines.append(f"{kind:8} {row['requests']:>9} {row['errors']:>7} {row['p50_ms']!s:>8} {row['p99_ms']!s:>8}")
    return "\n".join(lines)
