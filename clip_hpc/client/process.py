"""Process control for scripts and tests that start `clip-hpc serve` themselves: wait until it answers, stop it
by its own PID."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from clip_hpc.client.endpoint import Endpoint, resolve_endpoint
from clip_hpc.client.http_client import client_for
from clip_hpc.errors import UserError


def wait_for_server(connection_file: str | os.PathLike, proc: subprocess.Popen | None = None,
                    timeout: float = 300) -> Endpoint:
    """The server's endpoint on this node (port or socket) once its connection file exists and /health answers."""
    deadline = time.monotonic() + timeout
    path = Path(connection_file)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"clip-hpc serve exited early (exit {proc.returncode}); see its output")
        if path.exists():
            endpoint = resolve_endpoint(connection_file=path, server=True)
            with client_for(endpoint, timeout=2) as client:
                try:
                    if client.get("/health").status_code == 200:
                        return endpoint
                except httpx.HTTPError:
                    pass
        time.sleep(0.2)
    raise UserError(f"clip-hpc serve was not ready within {timeout:.0f} s ({path})")


def stop_server(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a `clip-hpc serve` started by a script, by its own PID: SIGTERM first, so it removes its files."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
