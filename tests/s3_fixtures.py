"""A real S3 endpoint for the object-store tests: moto's standalone server (as s3fs's own tests start it) on
127.0.0.1, stopped by its PID, behind a small recording proxy in the test process that logs every request (method,
key, Range header, status) and can answer 503 SlowDown for chosen keys: the counting fixture that proves ranged reads
and the failing object the run must record."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import unquote, urlsplit

import pytest

BUCKET = "bkt"  # S3 bucket names have at least 3 characters (the issue's `s3://b/` is short for it)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.url, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_MAX_ATTEMPTS": "1"}

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
                status, headers, data = 503, [("Content-Type", "application/xml")], (
                    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                    b"<Message>Please reduce your request rate.</Message></Error>")
            else:
                conn = http.client.HTTPConnection("127.0.0.1", moto_port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                resp = conn.getresponse()
                status, headers, data = resp.status, resp.getheaders(), resp.read()
                conn.close()
            endpoint.log.append(Request(self.command, key + (f"?{query}" if query else ""),
                                        self.headers.get("Range"), status))
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
    """`python -m moto.server` on a free loopback port (killed by its PID), and the recording proxy before it."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)
        endpoint = S3Endpoint(f"http://127.0.0.1:{port}", "")
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), _handler(endpoint, port))
        proxy.daemon_threads = True
        endpoint.url = f"http://127.0.0.1:{proxy.server_address[1]}"
        thread = threading.Thread(target=proxy.serve_forever, daemon=True)
        thread.start()
        try:
            yield endpoint
        finally:
            proxy.shutdown()
            proxy.server_close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def s3_client(endpoint: S3Endpoint):
    """An s3fs file system straight to moto (not through the proxy): the test's own uploads and checks."""
    import s3fs

    return s3fs.S3FileSystem(key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": endpoint.direct},
                             skip_instance_cache=True, use_listings_cache=False)
