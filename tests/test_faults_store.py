"""Nothing stalls: every call to an object store is bounded in time, and what goes wrong with a store is one line
naming the input. A store that accepts connections and never answers (a socket on 127.0.0.1 that only accepts) ends
`embed` within its small test bounds; with the server, it answers the image routes 503/504 while search and /health
go on; missing or bad credentials and an endpoint that refuses are said as such. Real moto S3 server for the index."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from clip_hpc.devdata.local_s3 import free_port, s3_env, upload
from clip_hpc.errors import UserError
from conftest import BIN, run_cli
from s3_fixtures import BUCKET, S3Endpoint
from server_fixtures import start_server
from test_embed import TINY

pytest.importorskip("s3fs")
SMALL_BOUNDS = {
    "CLIP_HPC_STORE_CONNECT_TIMEOUT": "1",
    "CLIP_HPC_STORE_READ_TIMEOUT": "1",
    "CLIP_HPC_STORE_CALL_TIMEOUT": "3",
}


@contextlib.contextmanager
def stalled_endpoint() -> Iterator[str]:
    """An HTTP endpoint that accepts every connection and never answers a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(512)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@contextlib.contextmanager
def refusing_credentials() -> Iterator[str]:
    """An S3 endpoint that answers every request 403 InvalidAccessKeyId, as AWS does for an unknown key."""

    class Deny(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _deny(self) -> None:
            body = (
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS "
                b"Access Key Id you provided does not exist in our records.</Message></Error>"
            )
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _deny

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def use_endpoint(monkeypatch, env: dict[str, str]) -> None:
    """This process's object-store client made anew for `env` (the clients are cached per process)."""
    from clip_hpc.ingest import object_store

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(object_store, "_filesystems", {})
    object_store.is_object.cache_clear()


def one_line_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_r12_embed_against_a_store_that_never_answers_ends_within_its_bounds(tmp_path: Path):
    with stalled_endpoint() as url:
        started = time.monotonic()
        proc = run_cli(
            "embed",
            f"s3://{BUCKET}/x/",
            "--out",
            tmp_path / "emb",
            *TINY,
            env={**s3_env(url), **SMALL_BOUNDS},
            timeout=90,
        )
        took = time.monotonic() - started
    line = one_line_failure(proc)
    assert f"s3://{BUCKET}/x/" in line and "did not answer within 3 s" in line, line
    assert took < 45, took


def no_aws_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLIP_HPC_STORE"))}


def test_r3_no_credentials_and_an_unreachable_endpoint_are_one_line(tmp_path: Path):
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    quiet = {
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    embed = [str(BIN / "clip-hpc"), "embed", f"s3://{BUCKET}/r3/", "--out", str(tmp_path / "emb"), *TINY]
    no_keys = {**no_aws_environment(), **quiet, **SMALL_BOUNDS, "AWS_ENDPOINT_URL": refused}
    proc = subprocess.run(embed, capture_output=True, text=True, timeout=90, env=no_keys)
    assert "credentials" in one_line_failure(proc)
    unreachable = {**no_aws_environment(), **s3_env(refused), **SMALL_BOUNDS}
    proc = subprocess.run(embed, capture_output=True, text=True, timeout=90, env=unreachable)
    line = one_line_failure(proc)
    assert f"s3://{BUCKET}/r3/" in line and ("cannot reach" in line or "did not answer" in line), line


def test_r3_botocore_errors_are_oserrors_for_every_store_call():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from clip_hpc.ingest.object_store import as_oserror

    assert isinstance(as_oserror(NoCredentialsError(), "s3://b/k"), PermissionError)
    assert isinstance(as_oserror(EndpointConnectionError(endpoint_url="http://x"), "s3://b/k"), ConnectionError)


def test_r4_a_bad_access_key_is_access_denied_not_missing(monkeypatch):
    from clip_hpc.ingest.sources import list_images

    with refusing_credentials() as url:
        use_endpoint(monkeypatch, {**s3_env(url), **SMALL_BOUNDS})
        with pytest.raises(UserError) as caught:
            list_images([f"s3://{BUCKET}/r4/"])
    message = str(caught.value)
    assert "access denied" in message and "does not exist" not in message, message
    assert "\n" not in message


def test_seen_a_url_file_list_and_an_upper_case_scheme(s3_endpoint: S3Endpoint, monkeypatch):
    from clip_hpc.ingest.sources import list_images

    with pytest.raises(UserError, match=f"--file-list s3://{BUCKET}/list.txt: a file list is a local file"):
        list_images(file_list=f"s3://{BUCKET}/list.txt")
    upload(s3_endpoint.direct, {f"{BUCKET}/up/a.jpg": b"x", f"{BUCKET}/up/b.png": b"y"})
    use_endpoint(monkeypatch, s3_endpoint.env)
    assert list_images([f"S3://{BUCKET}/up/"]) == [f"s3://{BUCKET}/up/a.jpg", f"s3://{BUCKET}/up/b.png"]


def png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 48), (shade, 255 - shade, 90)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def object_index(s3_endpoint: S3Endpoint, tmp_path_factory) -> Path:
    """An index of 6 objects, embedded and indexed from the moto store."""
    root = tmp_path_factory.mktemp("store-index")
    upload(s3_endpoint.direct, {f"{BUCKET}/r13/{i}.png": png(40 * i) for i in range(6)})
    run_cli(
        "embed", f"s3://{BUCKET}/r13/", "--out", root / "emb", *TINY, "--workers", "0", env=s3_endpoint.env, check=True
    )
    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    return root / "index"


def test_r13_a_stalled_store_never_starves_search_or_health(object_index: Path, tmp_path: Path):
    with stalled_endpoint() as url:
        env = {**s3_env(url), **SMALL_BOUNDS, "CLIP_HPC_STORE_SLOTS": "4"}
        with start_server(object_index, tmp_path / "serve", env=env) as served, served.client() as client:
            with ThreadPoolExecutor(60) as pool:
                thumbs = [pool.submit(client.get, f"/api/images/{i % 6}/thumb", params={"size": 32}) for i in range(60)]
                time.sleep(0.5)  # the thumbnails are waiting on the store now
                started = time.monotonic()
                health = client.get("/health", timeout=20)
                found = client.post("/api/search", json={"text": "a green square", "k": 3}, timeout=20)
                answered = time.monotonic() - started
                statuses = [t.result(timeout=60) for t in thumbs]
            assert health.status_code == 200 and found.status_code == 200 and answered < 20, answered
            assert {r.status_code for r in statuses} <= {503, 504}, {r.status_code for r in statuses}
            late = next(r for r in statuses if r.status_code == 504).json()["error"]
            assert late.startswith("image ") and "did not answer within 3 s" in late, late
            image = client.get("/api/images/1")
            assert image.status_code == 504 and "image 1" in image.json()["error"]
