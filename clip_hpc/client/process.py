"""Process control for commands that start other commands (the demo, scripts, tests): children die with their
parent (PR_SET_PDEATHSIG, so even a kill -9 of the parent takes them down), SIGTERM/SIGHUP end a parent as Ctrl-C
would (its `finally` blocks run and stop its children), and a started server is waited for and stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from clip_hpc.client.endpoint import Endpoint, resolve_endpoint
from clip_hpc.client.http_client import client_for
from clip_hpc.errors import UserError
from clip_hpc.formats.connection import read_connection_file
from clip_hpc.procs import die_with_parent

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SIGINT already raises KeyboardInterrupt


def child_preexec(extra: Callable[[], None] | None = None) -> Callable[[], None]:
    """A preexec_fn that ties the child to this process, then runs `extra` (e.g. a resource limit in a test)."""

    def preexec() -> None:
        die_with_parent()
        if extra is not None:
            extra()

    return preexec


def start_child(cmd: Sequence[str], *, preexec: Callable[[], None] | None = None, **kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen` for a child that must not outlive this process."""
    return subprocess.Popen(list(cmd), preexec_fn=child_preexec(preexec), **kwargs)


def run_child(cmd: Sequence[str], **kwargs: Any) -> int:
    """Run a child to its end; if this process is interrupted meanwhile, the child is stopped too (SIGTERM, then
    SIGKILL), never left running."""
    proc = start_child(cmd, **kwargs)
    try:
        return proc.wait()
    finally:
        stop_process(proc)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into an exception so every `finally` (stopping children, removing files) runs."""


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block SIGTERM (timeout, scancel, kill) and SIGHUP (a closed terminal) raise `Terminated`, as
    Ctrl-C raises KeyboardInterrupt; the previous handlers come back after."""
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_server(
    connection_file: str | os.PathLike, proc: subprocess.Popen | None = None, timeout: float = 300
) -> Endpoint:
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
    stale = read_connection_file(path).stale_reason() if path.exists() else None
    raise UserError(f"clip-hpc serve was not ready within {timeout:.0f} s ({path}{': ' + stale if stale else ''})")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a child by its own pid: SIGTERM first (so it removes its files), SIGKILL if it does not end."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


stop_server = stop_process  # the name scripts and tests know


@dataclass
class ChildServer:
    """A `clip-hpc serve` this process started (`serve_child`): where it answers, its process, its output."""

    endpoint: Endpoint
    proc: subprocess.Popen
    log: Path
    connection_file: Path


@contextlib.contextmanager
def serve_child(
    index_dir: str | os.PathLike,
    workdir: Path,
    *switches: str,
    name: str = "serve",
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
    timeout: float = 300,
) -> Iterator[ChildServer]:
    """`clip-hpc serve INDEX --connection-file WORKDIR/NAME.json [switches: default --port 0]` as a child of this
    process, yielded once /health answers and stopped by its pid after; its output goes to WORKDIR/NAME.log. For
    the scripts and tests that need a real server (the demo starts its own, with its own options)."""
    workdir.mkdir(parents=True, exist_ok=True)
    conn, log = workdir / f"{name}.json", workdir / f"{name}.log"
    conn.unlink(missing_ok=True)
    with open(log, "w") as out:
        proc = start_child(
            [
                str(Path(sys.executable).parent / "clip-hpc"),
                "serve",
                str(index_dir),
                "--connection-file",
                str(conn),
                *(switches or ("--port", "0")),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec=preexec,
            env={**os.environ, **(env or {})},
        )
    try:
        try:
            endpoint = wait_for_server(conn, proc, timeout=timeout)
        except UserError as exc:
            raise UserError(f"{exc}; its output ({log}):\n{log.read_text()[-4000:]}") from None
        yield ChildServer(endpoint, proc, log, conn)
    finally:
        stop_process(proc)
