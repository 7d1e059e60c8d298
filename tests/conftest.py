"""Shared fixtures. Stage-specific fixtures live in their own test modules (or tests/*_fixtures.py plugins)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "test-artifacts"
pytest_plugins = [
    "server_fixtures",
    "caption_fixtures",
    "s3_fixtures",
    "route_fixtures",
    "api_fixtures",
]  # stage fixture plugins (tests/*_fixtures.py)


def run_cli(
    *args: str, check: bool = False, timeout: float = 600, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    """Run the installed `clip-hpc` console script as a user would."""
    proc = subprocess.run(
        [str(BIN / "clip-hpc"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"clip-hpc {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def kill_after_shards(cmd: list[str], out: Path, shards: int = 3, timeout: float = 300) -> None:
    """Start `cmd` in its own session and SIGKILL its whole group once `shards` shards exist: a pre-emption."""
    from clip_hpc.formats.emb_dir import EmbDir

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while len(EmbDir(out).shard_files()) < shards and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def make_images(out: Path, n: int, seed: int = 0, extra: str = "") -> Path:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_sample_images.py"),
            str(out),
            "-n",
            str(n),
            "--seed",
            str(seed),
            *extra.split(),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """300+ varied real-format images, made once per session."""
    return make_images(tmp_path_factory.mktemp("samples") / "images", 320)
