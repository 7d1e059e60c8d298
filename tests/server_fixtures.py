"""Fixtures for the serve-stage tests: a real INDEX_DIR built by the real pipeline (embed, then index, with the
tiny model) and a real `clip-hpc serve` process on 127.0.0.1, stopped by its own pid."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clip_hpc.client.http_client import make_client
from clip_hpc.client.process import serve_child
from conftest import make_images, run_cli

TOKEN = "test-token-" + "x" * 24
N_IMAGES = 60


@dataclass
class Served:
    """A running server: where it is, how to get in, what it serves."""

    url: str
    port: int | None
    uds: str | None
    token: str
    connection_file: Path
    index_dir: Path
    proc: subprocess.Popen
    log: Path

    def client(self, *, auth: bool = True) -> httpx.Client:
        return make_client(self.url, uds=self.uds, token=self.token if auth else None, timeout=60)


@pytest.fixture(scope="session")
def served_index(tmp_path_factory) -> Path:
    """60 sample images -> clip-hpc embed -> clip-hpc index: the INDEX_DIR every serve test uses."""
    root = tmp_path_factory.mktemp("served")
    images = make_images(root / "images", N_IMAGES)
    run_cli(
        "embed",
        images,
        "--out",
        root / "emb",
        "--model",
        "clip-hpc-tiny",
        "--pretrained",
        "none",
        "--shard-size",
        "50",
        "--workers",
        "0",
        check=True,
    )
    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    return root / "index"


@contextlib.contextmanager
def start_server(
    index_dir: Path,
    workdir: Path,
    *extra: str,
    token: str = TOKEN,
    env: dict | None = None,
    preexec: Callable[[], None] | None = None,
) -> Iterator[Served]:
    """`clip-hpc serve INDEX --port 0 --connection-file F` (serve_child: it dies with the test process, and a
    server that fails to start raises with its output); `preexec` runs in it first (e.g. a lower fd limit)."""
    with serve_child(
        index_dir, workdir, *extra, timeout=180, preexec=preexec, env={"CLIP_HPC_TOKEN": token, **(env or {})}
    ) as child:
        yield Served(
            child.endpoint.base_url,
            child.endpoint.port,
            child.endpoint.uds,
            token,
            child.connection_file,
            index_dir,
            child.proc,
            child.log,
        )


@pytest.fixture(scope="session")
def live_server(served_index: Path, tmp_path_factory) -> Iterator[Served]:
    """One real uvicorn process on 127.0.0.1 for the session; a 1 MiB upload limit to test 413 cheaply."""
    with start_server(served_index, tmp_path_factory.mktemp("live"), "--port", "0", "--max-upload-mb", "1") as srv:
        yield srv
