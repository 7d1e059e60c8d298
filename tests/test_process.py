"""Process hygiene: `clip-hpc demo` takes its children with it on SIGTERM (and on kill -9), `clip-hpc serve`
removes its connection file on SIGHUP and SIGUSR1, two servers never share a connection file, and a reader of a
file whose server was killed is told so (B6, D5, 6b). Cost: ~60 s (a 100-image demo, three small servers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from clip_hpc.client.process import wait_for_server
from clip_hpc.procs import pid_alive
from conftest import BIN, run_cli
from server_fixtures import TOKEN, start_server


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line mentions `text`: what a run left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def start_demo(out: Path) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(
        [str(BIN / "clip-hpc"), "demo", "--out", str(out), "--images", "100", "--ranks", "1", "--index-key", "Flat"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_stopping_the_demo_while_it_serves_leaves_no_process_and_no_connection_file(tmp_path, how):
    out = tmp_path / "demo"
    demo = start_demo(out)
    try:
        conn = out / "connection.json"
        assert wait_until(lambda: conn.exists(), 600), (out.parent / "demo.log").read_text()[-3000:]
        wait_for_server(conn, timeout=120)
        assert len(processes_mentioning(str(out))) >= 2  # the demo and its server
        demo.send_signal(how)
        assert wait_until(lambda: not processes_mentioning(str(out)) and not conn.exists(), 10), (
            processes_mentioning(str(out)),
            conn.exists(),
        )
    finally:
        if demo.poll() is None:
            demo.kill()
        demo.wait()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1, signal.SIGINT])
def test_serve_removes_its_connection_file_on_every_stop_signal(served_index, tmp_path, sig):
    with start_server(served_index, tmp_path / "srv") as srv:
        os.kill(srv.proc.pid, sig)
        srv.proc.wait(timeout=20)
        assert not srv.connection_file.exists()


def test_a_second_server_refuses_a_live_servers_file_and_takes_over_a_dead_ones(served_index, tmp_path):
    with start_server(served_index, tmp_path / "srv") as first:
        second = run_cli(
            "serve",
            served_index,
            "--port",
            "0",
            "--connection-file",
            first.connection_file,
            env={"CLIP_HPC_TOKEN": "other-" + TOKEN},
            timeout=120,
        )
        assert second.returncode == 2 and "belongs to a running server" in second.stderr, second.stderr[-2000:]
        assert json.loads(first.connection_file.read_text())["pid"] == first.proc.pid
        os.kill(first.proc.pid, signal.SIGKILL)  # D5: kill -9 cannot clean up; readers must see it is stale
        first.proc.wait()
        check = run_cli("check-ports", "--server", "--connection-file", first.connection_file, timeout=60)
        assert check.returncode == 1 and f"pid {first.proc.pid}) is gone" in check.stdout, check.stdout
        with start_server(served_index, tmp_path / "srv") as third:  # the same file, taken over
            assert json.loads(third.connection_file.read_text())["pid"] == third.proc.pid


def test_a_child_dies_with_its_parent_even_on_kill_9(tmp_path):
    marker = f"clip-hpc-orphan-check-{os.getpid()}"
    parent = subprocess.Popen(
        [
            str(BIN / "python"),
            "-c",
            (
                "import sys, time; from clip_hpc.client.process import start_child;"
                f"start_child([sys.executable, '-c', 'import time; time.sleep(300)', '{marker}']); time.sleep(300)"
            ),
        ]
    )
    assert wait_until(lambda: len(processes_mentioning(marker)) == 2, 30)  # the parent and its child
    parent.kill()
    parent.wait()
    assert wait_until(lambda: not processes_mentioning(marker), 10)
