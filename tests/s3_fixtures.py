"""A real S3 endpoint for the object-store tests: moto's standalone server (as s3fs's own tests start it) on
127.0.0.1, stopped by its PID, behind a small recording proxy in the test process that logs every request (method,
key, Range header, status) and can answer 503 SlowDown for chosen keys: the counting fixture that proves ranged reads
and the failing object the run must record."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

from clip_hpc.devdata.local_s3 import moto_server, s3_env

BUCKET = "bkt"  # S3 bucket names have at least 3 characters (the issue's `s3://b/` is short for it)


@dataclass
class Request:
    method: str
    key: str  # "bucket/key", unquoted
    range: str | None
    status: int


@dataclass
class S3Endpoint:
    """moto at `direct`, the recording proxy at `url`; `env` is all a child process needs to reach it."""

    direct: str
    url: str
    log: list[Request] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)  # "bucket/key" answered 503 SlowDown on GET

    @property
    def env(self) -> dict[str, str]:
        """Through the proxy; botocore's own retries off, so a throttled object costs only s3fs's (~2 s)."""
        return {**s3_env(self.url), "AWS_MAX_ATTEMPTS": "1"}

    def gets(self, key_suffix: str = "") -> list[Request]:
        return [r for r in self.log if r.method == "GET" and r.key.endswith(key_suffix) and "?" not in r.key]


def _handler(endpoint: S3Endpoint, moto_port: int) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            key = unquote(urlsplit(self.path).path.lstrip("/"))
            query = urlsplit(self.path).query
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "GET" and key in endpoint.failing:
                status, headers, data = (
                    503,
                    [("Content-Type", "application/xml")],
                    (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    ),
                )
            else:
                conn = http.client.HTTPConnection("127.0.0.1", moto_port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                resp = conn.getresponse()
                status, headers, data = resp.status, resp.getheaders(), resp.read()
                conn.close()
            endpoint.log.append(
                Request(self.command, key + (f"?{query}" if query else ""), self.headers.get("Range"), status)
            )
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))  # a HEAD's length is the object's
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Forward


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """moto's server (`local_s3.moto_server`, killed by its PID), and the recording proxy before it."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    with moto_server() as direct:
        endpoint = S3Endpoint(direct, "")
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), _handler(endpoint, int(direct.rsplit(":", 1)[1])))
        proxy.daemon_threads = True
        endpoint.url = f"http://127.0.0.1:{proxy.server_address[1]}"
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            yield endpoint
        finally:
            proxy.shutdown()
            proxy.server_close()
