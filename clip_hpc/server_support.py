"""The server's plumbing, kept apart from its routes: token lookup, the upload size limit, the model guard with
its LRU cache of text embeddings, Prometheus metrics and ZIP export."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def auth_cookie_name(token: str) -> str:
    """Cookies ignore ports, so two servers tunnelled to two localhost ports need two cookie names."""
    return "clip_hpc_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def token_from_request(request: Request, cookie: str) -> tuple[str | None, str]:
    """(token, where it came from): the header, then the query string, then the cookie."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip(), "header"
    if "token" in request.query_params:
        return request.query_params["token"], "query"
    if cookie in request.cookies:
        return request.cookies[cookie], "cookie"
    return None, ""


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body too large: the limit is {self.max_bytes / 2**20:.1f} MiB (serve --max-upload-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await JSONResponse({"error": self._message()}, status_code=413,
                               headers={"Connection": "close"})(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # FastAPI re-raises HTTPException from body reading; our handler answers
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)


class Metrics:
    """Just enough Prometheus text format: request counts, a latency histogram per route, the text cache."""

    def __init__(self, index_vectors: int) -> None:
        self.index_vectors = index_vectors
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, list[float]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.cache = {"hit": 0, "miss": 0}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, method, status)] += 1
            counts = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, bound in enumerate(LATENCY_BUCKETS):
                counts[i] += seconds <= bound
            counts[-1] += 1
            self.latency_sum[route] += seconds

    def cache_event(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.cache[kind] += n

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP clip_hpc_index_vectors Vectors in the served index.", "# TYPE clip_hpc_index_vectors gauge",
                     f"clip_hpc_index_vectors {self.index_vectors}",
                     "# HELP clip_hpc_requests_total HTTP requests by route, method and status.",
                     "# TYPE clip_hpc_requests_total counter"]
            lines += [f'clip_hpc_requests_total{{route="{r}",method="{m}",status="{s}"}} {n}'
                      for (r, m, s), n in sorted(self.requests.items())]
            lines += ["# HELP clip_hpc_request_seconds Request latency.", "# TYPE clip_hpc_request_seconds histogram"]
            for route, counts in sorted(self.latency.items()):
                bounds = [*map(str, LATENCY_BUCKETS), "+Inf"]
                lines += [f'clip_hpc_request_seconds_bucket{{route="{route}",le="{b}"}} {c}'
                          for b, c in zip(bounds, counts)]
                lines += [f'clip_hpc_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}',
                          f'clip_hpc_request_seconds_count{{route="{route}"}} {counts[-1]}']
            lines += ["# HELP clip_hpc_text_cache_total Text embedding cache lookups.",
                      "# TYPE clip_hpc_text_cache_total counter"]
            lines += [f'clip_hpc_text_cache_total{{result="{k}"}} {v}' for k, v in self.cache.items()]
        return "\n".join(lines) + "\n"


class ModelGuard:
    """One model call at a time (threads would only fight over the same cores or GPU) and an LRU cache of text
    embeddings in front of it; installed on the engine so that every text it embeds goes through the cache."""

    def __init__(self, engine: Any, cache_size: int, metrics: Metrics) -> None:
        self.lock = threading.Lock()
        self.cache_lock = threading.Lock()
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = cache_size
        self.metrics = metrics
        self._encode_text: Callable[[Sequence[str]], np.ndarray] = engine.encode_text
        self._encode_images: Callable[[Sequence[Any]], np.ndarray] = engine.encode_images
        engine.encode_text = self.encode_text
        engine.encode_images = self.encode_images

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        with self.cache_lock:
            found = {t: self.cache[t] for t in texts if t in self.cache}
            for t in found:
                self.cache.move_to_end(t)
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        self.metrics.cache_event("hit", len(texts) - len(missing))
        self.metrics.cache_event("miss", len(missing))
        if missing:
            with self.lock:
                with self.cache_lock:  # a thread that waited here may find its text computed meanwhile
                    found.update({t: self.cache[t] for t in missing if t in self.cache})
                todo = [t for t in missing if t not in found]
                vectors = np.asarray(self._encode_text(todo), dtype=np.float32) if todo else []
            with self.cache_lock:
                for t, v in zip(todo, vectors):
                    v.setflags(write=False)
                    self.cache[t] = found[t] = v
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        with self.lock:
            return self._encode_images(images)


def share_model_safely(engine: Any, cache_size: int, metrics: Metrics) -> ModelGuard:
    return ModelGuard(engine, cache_size, metrics)


def build_zip(items: Sequence[tuple[int, Path, float | None]]) -> str:
    """`images/<id>_<name>` plus `metadata.json` (id, path, score, file), in a temporary file the caller deletes.

    Images are stored, not deflated: they are compressed already, and the ZIP may be large.
    """
    fd, tmp = tempfile.mkstemp(prefix="clip-hpc-export-", suffix=".zip")
    os.close(fd)
    metadata: list[dict[str, Any]] = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for image_id, path, score in items:
            name = f"images/{image_id}_{path.name}"
            zf.write(path, name)
            metadata.append({"id": image_id, "path": str(path), "score": score, "file": name})
        zf.writestr("metadata.json", json.dumps(metadata, indent=2), compress_type=zipfile.ZIP_DEFLATED)
    return tmp
