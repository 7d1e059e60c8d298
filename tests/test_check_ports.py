"""`check-ports` and the CLI client against real sockets and a real `clip-hpc serve` process. (The same checks
through a real sshd tunnel live with the ssh tests.)"""

from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import sys
import threading

from clip_hpc.server.sockets import bind_tcp, free_port
from conftest import ROOT, run_cli
from server_fixtures import TOKEN, start_server


# --- check-ports -------------------------------------------------------------------------------------------------
def check_ports(*args: str) -> tuple[int, list[str]]:
    proc = run_cli("check-ports", *args, timeout=120)
    assert not proc.stderr.strip() or proc.returncode == 2, proc.stderr
    return proc.returncode, proc.stdout.splitlines()


def test_check_ports_passes_against_a_live_server(live_server):
    for args in (
        ("--connection-file", str(live_server.connection_file)),
        ("--connection-file", str(live_server.connection_file), "--server"),
        ("--port", str(live_server.port), "--token", TOKEN),
    ):
        rc, lines = check_ports(*args)
        assert rc == 0 and len(lines) == 4 and all(line.startswith("PASS") for line in lines), lines


def test_check_ports_names_a_wrong_or_missing_token(live_server):
    rc, lines = check_ports("--port", str(live_server.port), "--token", "wrong")
    assert rc == 1 and lines[0].startswith("PASS") and lines[1].startswith("PASS")
    assert lines[2].startswith("FAIL") and "token rejected: copy it from the connection file" in lines[2]
    assert lines[3].startswith("SKIP")
    rc, lines = check_ports("--port", str(live_server.port))
    assert rc == 1 and lines[2].startswith("FAIL") and "no token given" in lines[2]


def test_check_ports_without_tunnel_prints_the_ssh_command(live_server, tmp_path):
    info = json.loads(live_server.connection_file.read_text())
    info["local_port"] = free_port()  # the laptop side: nothing listens there
    copy = tmp_path / "laptop-copy.json"
    copy.write_text(json.dumps(info))
    rc, lines = check_ports("--connection-file", str(copy))
    assert rc == 1 and lines[0].startswith("FAIL")
    assert (
        f"nothing listens on localhost:{info['local_port']}: is the tunnel up? run: {info['ssh_command']}" in lines[0]
    )
    assert all(line.startswith("SKIP") for line in lines[1:])


def test_check_ports_without_tunnel_names_each_ssh_hop_to_test(live_server, tmp_path):
    """A tunnel that will not come up fails at one hop (MFA or key on the login node, user or job on the node):
    the FAIL line gives one command per hop, with the user and key of the printed command."""
    info = json.loads(live_server.connection_file.read_text())
    info["local_port"] = free_port()
    info["ssh_command"] = (
        "ssh -N -L 9000:localhost:9000 -i ~/.ssh/nersc "
        "-o 'ProxyCommand=ssh -i ~/.ssh/nersc -W %h:%p me@perlmutter.nersc.gov' me@nid001234"
    )
    copy = tmp_path / "laptop-copy.json"
    copy.write_text(json.dumps(info))
    rc, lines = check_ports("--connection-file", str(copy))
    assert rc == 1 and lines[0].startswith("FAIL")
    assert "hop 1 laptop -> perlmutter.nersc.gov: ssh -i ~/.ssh/nersc me@perlmutter.nersc.gov true" in lines[0]
    assert "hop 2 perlmutter.nersc.gov -> nid001234: ssh -i ~/.ssh/nersc -o 'ProxyCommand=" in lines[0]


@contextlib.contextmanager
def foreign_http_server():
    """Another program holding the port: any HTTP server that is not clip-hpc."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def dead_end_tunnel():
    """What `ssh -L` does when the far end is gone: it accepts, then closes without a byte."""
    listener = bind_tcp("127.0.0.1", 0)
    stop = threading.Event()

    def accept_and_close() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_check_ports_spots_another_program_on_the_port():
    with foreign_http_server() as port:
        rc, lines = check_ports("--port", str(port), "--token", TOKEN)
    assert rc == 1 and lines[0].startswith("PASS") and lines[1].startswith("FAIL")
    assert (
        f"port {port} answers (HTTP 404) but is not clip-hpc: another program holds it, pick another local port"
        in lines[1]
    )


def test_check_ports_spots_a_tunnel_with_nothing_behind_it():
    with dead_end_tunnel() as port:
        rc, lines = check_ports("--port", str(port), "--token", TOKEN)
    assert rc == 1 and lines[0].startswith("PASS") and lines[1].startswith("FAIL")
    assert "is up but nothing answers behind it" in lines[1] and "squeue" in lines[1]


class HealthyThenGone(http.server.BaseHTTPRequestHandler):
    """A server that passes the health check, then dies on the next request (a job killed between the steps)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/health":
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.close_connection = True  # no status line at all: the client sees the connection drop

    def log_message(self, *args: object) -> None:
        pass


def test_check_ports_names_a_server_that_stops_answering_after_its_health_check():
    """The token step's request was not guarded: a server gone between the steps was a traceback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HealthyThenGone)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc, lines = check_ports("--port", str(server.server_address[1]), "--token", TOKEN)
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 1 and lines[1].startswith("PASS") and lines[2].startswith("FAIL")
    assert "stopped answering after its health check" in lines[2]


def test_check_ports_needs_a_port_or_a_file():
    proc = run_cli("check-ports")
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "clip-hpc check-ports: error: give --port P or --connection-file PATH"
    )


# --- the CLI client ----------------------------------------------------------------------------------------------
def test_cli_client_by_url_and_by_connection_file(live_server):
    with live_server.client() as c:
        expected = [h["path"] for h in c.get("/api/search", params={"q": "yellow", "k": 4}).json()["results"]]
    by_url = run_cli("search", "--url", live_server.url, "--token", TOKEN, "yellow", "-k", "4", "--json", check=True)
    assert [h["path"] for h in json.loads(by_url.stdout)["results"]] == expected
    by_file = run_cli("search", "--connection-file", live_server.connection_file, "yellow", "-k", "4", check=True)
    assert [line.split()[-1] for line in by_file.stdout.splitlines()] == expected
    image = run_cli(
        "search", "--connection-file", live_server.connection_file, "--image", expected[0], "-k", "1", check=True
    )
    assert image.stdout.split()[-1] == expected[0]
    denied = run_cli("search", "--url", live_server.url, "--token", "wrong", "yellow")
    assert denied.returncode == 2 and denied.stderr.startswith("clip-hpc search: error: server answered 401")


def test_server_mode_over_a_unix_socket(served_index, tmp_path):
    with start_server(served_index, tmp_path, "--uds", str(tmp_path / "clip.sock")) as srv:
        rc, lines = check_ports("--connection-file", str(srv.connection_file), "--server")
        assert rc == 0 and all(line.startswith("PASS") for line in lines), lines
        assert str(tmp_path / "clip.sock") in lines[0]
        found = run_cli("search", "--connection-file", srv.connection_file, "--server", "red", "-k", "2", check=True)
        assert len(found.stdout.splitlines()) == 2


def test_check_ports_script_is_the_same_command():
    port = free_port()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_ports.py"), "--port", str(port), "--token", "t"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stdout.startswith(f"FAIL  1 something listens on localhost:{port}")
