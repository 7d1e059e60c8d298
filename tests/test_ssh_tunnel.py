"""The laptop -> ssh tunnel -> compute node chain, for real: an sshd on loopback with throwaway keys
(scripts/sshd-local.sh) stands for the login node, a `clip-hpc serve` process for the compute node, and
`clip-hpc check-ports` runs on the "laptop" side of an `ssh -N -L` tunnel."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clip_hpc.server.sockets import free_port
from conftest import ROOT, run_cli
from server_fixtures import TOKEN, Served, start_server

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

SSHD_LOCAL = ROOT / "scripts" / "sshd-local.sh"


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real sshd on 127.0.0.1: its own config, host key and authorized client key; stopped by its pid."""
    missing = [b for b in ("ssh", "ssh-keygen") if not shutil.which(b)]
    if missing or not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        pytest.skip("OpenSSH server/client not installed: run scripts/install_test_services.sh")
    state = tmp_path_factory.mktemp("sshd")
    env = {**os.environ, "CLIP_HPC_SSHD_DIR": str(state), "CLIP_HPC_SSHD_PORT": str(free_port())}
    up = subprocess.run([str(SSHD_LOCAL), "up"], capture_output=True, text=True, env=env, timeout=60)
    try:
        assert up.returncode == 0, f"sshd-local.sh up failed:\n{up.stdout}{up.stderr}"
        yield {**env, **dict(line.split("=", 1) for line in up.stdout.split())}
    finally:
        subprocess.run([str(SSHD_LOCAL), "down"], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def node_server(served_index: Path, tmp_path_factory) -> Iterator[Served]:
    """The "compute node": clip-hpc serve on 127.0.0.1, port 0, connection file with the token."""
    with start_server(
        served_index, tmp_path_factory.mktemp("node"), env={"CLIP_HPC_LOGIN_HOST": "root@127.0.0.1"}
    ) as served:
        yield served


@contextlib.contextmanager
def tunnel(sshd: dict[str, str], local_port: int, remote_port: int) -> Iterator[subprocess.Popen]:
    """`ssh -N -L local:127.0.0.1:remote` through the loopback sshd, up until the local port accepts."""
    proc = subprocess.Popen(
        [str(SSHD_LOCAL), "tunnel", str(local_port), str(remote_port)],
        env=sshd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not accepts(local_port):
            if proc.poll() is not None:
                raise AssertionError(f"ssh tunnel exited ({proc.returncode}): {proc.stdout.read()}")
            assert time.monotonic() < deadline, "the ssh tunnel did not come up in 30 s"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


def laptop_connection_file(served: Served, local_port: int, tmp_path: Path) -> Path:
    """The connection file as copied to the laptop, where the tunnel listens on `local_port`."""
    info = json.loads(served.connection_file.read_text())
    info["local_port"] = local_port
    copy = tmp_path / "laptop-connection.json"
    copy.write_text(json.dumps(info))
    return copy


def check_ports(*args: str | Path) -> tuple[int, list[str]]:
    proc = run_cli("check-ports", *args, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout.splitlines()


def statuses(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in lines]


def test_check_ports_passes_every_step_through_the_tunnel(sshd, node_server: Served, tmp_path: Path) -> None:
    local = free_port()
    with tunnel(sshd, local, node_server.port):
        code, lines = check_ports("--port", str(local), "--token", TOKEN)
        assert (code, statuses(lines)) == (0, ["PASS"] * 4), lines
        code, lines = check_ports("--connection-file", laptop_connection_file(node_server, local, tmp_path))
        assert (code, statuses(lines)) == (0, ["PASS"] * 4), lines
        resp = httpx.get(
            f"http://127.0.0.1:{local}/api/search",
            params={"q": "a blue square", "k": 3},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
            trust_env=False,
        )
        assert resp.status_code == 200 and len(resp.json()["results"]) == 3
    log = (Path(sshd["CLIP_HPC_SSHD_DIR"]) / "sshd.log").read_text()
    assert "Accepted publickey for" in log, "the requests did not go through the sshd"


def test_tunnel_down_fails_at_step_1_with_the_ssh_command(sshd, node_server: Served, tmp_path: Path) -> None:
    local = free_port()
    with tunnel(sshd, local, node_server.port) as proc:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert not accepts(local)
    code, lines = check_ports("--connection-file", laptop_connection_file(node_server, local, tmp_path))
    assert code == 1 and statuses(lines) == ["FAIL", "SKIP", "SKIP", "SKIP"], lines
    ssh_command = json.loads(node_server.connection_file.read_text())["ssh_command"]
    assert "is the tunnel up" in lines[0] and ssh_command in lines[0], lines[0]


def test_wrong_token_fails_at_step_3(sshd, node_server: Served) -> None:
    local = free_port()
    with tunnel(sshd, local, node_server.port):
        code, lines = check_ports("--port", str(local), "--token", "not-the-token")
    assert code == 1 and statuses(lines) == ["PASS", "PASS", "FAIL", "SKIP"], lines
    assert "token rejected" in lines[2] and "connection file" in lines[2], lines[2]


def test_another_program_on_the_port_fails_at_step_2(node_server: Served, tmp_path: Path) -> None:
    taken = free_port()
    other = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(taken), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not accepts(taken):
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.1)
        # Where a tunnel was meant to listen, another program answers (ssh -L may still bind ::1 beside it).
        code, lines = check_ports("--port", str(taken), "--token", TOKEN)
        assert code == 1 and statuses(lines) == ["PASS", "FAIL", "SKIP", "SKIP"], lines
        assert "not clip-hpc" in lines[1] and "another program" in lines[1], lines[1]
    finally:
        other.terminate()
        other.wait(timeout=10)


def test_the_printed_tunnel_with_a_key_logs_in_on_both_hops(sshd, node_server: Served, tmp_path: Path) -> None:
    """The command the server prints, with the profile's key and user, through two real hops: the loopback sshd as
    the login node, then again as the compute node ("localhost"). This user has no key of its own (-J would hand
    -i to the node hop only), so both logins prove the key reached both. The test's ssh config only adds the node's
    port and skips host-key checks, given to both ssh processes."""
    from clip_hpc.formats.connection import ssh_command

    user, port = sshd["SSHD_USER"], sshd["CLIP_HPC_SSHD_PORT"]
    local = free_port()
    command = ssh_command(
        "localhost", port=node_server.port, local_port=local, login=f"{user}@127.0.0.1:{port}", key=sshd["SSHD_KEY"]
    )
    assert f"{user}@localhost" in command and command.count(sshd["SSHD_KEY"]) == 2, command
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
        f"  ExitOnForwardFailure yes\n  LogLevel ERROR\nHost localhost\n  Port {port}\n"
    )
    words = shlex.split(command.replace("ProxyCommand=ssh ", f"ProxyCommand=ssh -F {config} "))
    log = Path(sshd["CLIP_HPC_SSHD_DIR"]) / "sshd.log"
    logins_before = log.read_text().count("Accepted publickey")
    proc = subprocess.Popen(
        [words[0], "-F", str(config), *words[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not accepts(local):
            if proc.poll() is not None:
                raise AssertionError(f"the printed ssh command exited ({proc.returncode}): {proc.stdout.read()}")
            assert time.monotonic() < deadline, "the tunnel did not come up in 30 s"
            time.sleep(0.1)
        code, lines = check_ports("--port", str(local), "--token", TOKEN)
        assert (code, statuses(lines)) == (0, ["PASS"] * 4), lines
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    assert log.read_text().count("Accepted publickey") - logins_before == 2, "one login per hop"
