"""A local S3 endpoint for tests and the benchmark: moto's standalone server (`moto[server]`, as s3fs's own test
suite runs it) on 127.0.0.1, stopped by its PID, and the environment a child process needs to use it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """Test credentials and the endpoint, and nothing from this user's ~/.aws: all `clip-hpc embed` needs."""
    return {
        **TEST_CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@contextlib.contextmanager
def moto_server(timeout: float = 60) -> Iterator[str]:
    """`python -m moto.server` on a free loopback port; yields its URL and kills it by PID on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def client(endpoint: str) -> Any:
    """An s3fs file system straight to `endpoint` with the test credentials (no listing cache: uploads show)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def upload(endpoint: str, objects: Mapping[str, bytes | Path]) -> None:
    """Create the buckets and put `bucket/key -> bytes (or a file)`."""
    fs = client(endpoint)
    for bucket in sorted({key.split("/", 1)[0] for key in objects}):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    for key, data in objects.items():
        fs.pipe_file(key, data.read_bytes() if isinstance(data, Path) else data)
