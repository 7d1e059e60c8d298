"""Getting from a laptop to a server on a shared compute node: free ports, the connection file, the ssh command,
a small HTTP client, and `check_ports`, which says which hop of the chain is broken and how to fix it.

The chain is browser -> laptop port -> ssh tunnel -> node port or unix socket -> clip-hpc server; each step of
`check_ports` tests one more hop, so the first FAIL names the broken one.
"""
from __future__ import annotations

import base64
import datetime as _dt
import errno
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_write_bytes

DEFAULT_LOCAL_PORT = 8765  # what the laptop side of a unix-socket tunnel listens on
LOGIN_HOST_ENV = "CLIP_HPC_LOGIN_HOST"
LOGIN_PLACEHOLDER = "<login-node>"
CONNECTIONS_DIR = Path("~/.clip-hpc/connections")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# --- ports and the connection file -----------------------------------------------------------------------------
def bind_tcp(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind and listen before anyone is told the port: `--port 0` then cannot race another process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is taken: pick another with --port, or --port 0 for a free one")
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}")
    sock.listen(2048)
    return sock


def bind_unix(path: str | os.PathLike) -> socket.socket:
    """A unix socket with mode 0600 from birth (umask), so no other user on the node can ever connect."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise UserError(f"{path} exists and is not a socket: choose another --uds path")
        if _unix_answers(path):
            raise UserError(f"a server already listens on {path}: stop it or choose another --uds path")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(2048)
    return sock


def _unix_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and suggestions; the server itself binds port 0)."""
    with bind_tcp(host, 0) as sock:
        return int(sock.getsockname()[1])


def login_host() -> str:
    return os.environ.get(LOGIN_HOST_ENV) or LOGIN_PLACEHOLDER


def ssh_command(node: str, *, port: int | None = None, uds: str | None = None, bind_host: str = "127.0.0.1",
                local_port: int | None = None, login: str | None = None) -> str:
    """The tunnel that reaches this server from a laptop.

    A server bound to the node's loopback or a unix socket is only reachable from the node itself, so the tunnel
    must end there (`-J` hops through the login node); a server bound to the node's network interface can be
    forwarded by the login node directly.
    """
    login = login or login_host()
    local = local_port or port or DEFAULT_LOCAL_PORT
    if uds:
        return f"ssh -N -L {local}:{uds} -J {login} {node}"
    if bind_host in LOOPBACK:
        return f"ssh -N -L {local}:localhost:{port} -J {login} {node}"
    return f"ssh -N -L {local}:{node}:{port} {login}"


def browser_url(local_port: int, token: str) -> str:
    return f"http://localhost:{local_port}/?token={token}"


def default_connection_path(name: str | None = None) -> Path:
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    return CONNECTIONS_DIR.expanduser() / f"{name}.json"


def connection_info(*, token: str, port: int | None = None, uds: str | None = None,
                    bind_host: str = "127.0.0.1", index_dir: str = "") -> dict[str, Any]:
    """Everything a laptop (or check-ports) needs to reach this server, as written to the connection file."""
    node = socket.gethostname()
    local_port = port or DEFAULT_LOCAL_PORT
    return {
        "host": node, "bind_host": None if uds else bind_host, "port": port, "uds": uds, "local_port": local_port,
        "token": token, "pid": os.getpid(), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "url": browser_url(local_port, token), "index_dir": index_dir,
        "ssh_command": ssh_command(node, port=port, uds=uds, bind_host=bind_host, local_port=local_port),
    }


def write_connection_file(path: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Mode 0600 before the token is written: the file is the key to the server."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o177)
    try:
        atomic_write_bytes(path, (json.dumps(info, indent=2) + "\n").encode())
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return path


def read_connection_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"connection file {path} does not exist: is the server started? (clip-hpc serve ... "
                        f"--connection-file {path})")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read connection file {path}: {exc}")
    if not isinstance(info, dict) or "token" not in info or not (info.get("port") or info.get("uds")):
        raise UserError(f"{path} is not a clip-hpc connection file (no token, port or uds)")
    return info


def remove_connection_file(path: str | os.PathLike) -> None:
    """Only our own: a newer server may have taken over the same file."""
    path = Path(path).expanduser()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


# --- client ----------------------------------------------------------------------------------------------------
def make_client(base_url: str | None = None, *, uds: str | None = None, token: str | None = None,
                timeout: float = 30.0) -> httpx.Client:
    """An httpx client for a server reached by URL or, on the node itself, by unix socket."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(uds=uds) if uds else None
    return httpx.Client(base_url=base_url or "http://localhost", headers=headers, transport=transport,
                        timeout=timeout, trust_env=False)


def wait_for_server(connection_file: str | os.PathLike, proc: subprocess.Popen | None = None,
                    timeout: float = 300) -> dict[str, Any]:
    """For scripts that start `clip-hpc serve`: its connection file once /health answers (port or socket)."""
    deadline = time.monotonic() + timeout
    path = Path(connection_file)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"clip-hpc serve exited early (exit {proc.returncode}); see its output")
        if path.exists():
            info = read_connection_file(path)
            base = "http://localhost" if info.get("uds") else f"http://127.0.0.1:{info['port']}"
            with make_client(base, uds=info.get("uds"), timeout=2) as client:
                try:
                    if client.get("/health").status_code == 200:
                        return info
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


def resolve_endpoint(*, url: str | None = None, token: str | None = None, connection_file: str | None = None,
                     server: bool = False) -> tuple[str, str | None, str | None]:
    """(base URL, uds, token) from a URL or a connection file; `server` means 'I am on the node'."""
    if connection_file:
        info = read_connection_file(connection_file)
        token = token or info["token"]
        if server and info.get("uds"):
            return "http://localhost", info["uds"], token
        port = info["port"] if server else info.get("local_port") or info["port"]
        host = (info.get("bind_host") or "127.0.0.1") if server else "localhost"
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return url or f"http://{host}:{port}", None, token
    if not url:
        raise UserError("give --url URL (and --token) or --connection-file PATH")
    return url.split("?")[0].rstrip("/") or url, None, token


def remote_search(base_url: str, text: str | None = None, *, image: str | None = None, token: str | None,
                  uds: str | None = None, k: int = 10) -> dict:
    """The CLI's client mode: text (GET /api/search), an image (upload), or both (POST /api/search)."""
    if not text and not image:
        raise UserError("give a text query, --image PATH, or both")
    data = None
    if image:
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {image}: {exc.strerror}")
    with make_client(base_url, uds=uds, token=token) as client:
        try:
            if data is not None and text:
                payload = {"text": text, "image_b64": base64.b64encode(data).decode(), "k": k}
                resp = client.post("/api/search", json=payload)
            elif data is not None:
                resp = client.post("/api/search/image", params={"k": k}, files={"file": (Path(image).name, data)})
            else:
                resp = client.get("/api/search", params={"q": text, "k": k})
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach {base_url}: {exc}; run clip-hpc check-ports to find the broken hop")
    if resp.status_code != 200:
        raise UserError(f"server answered {resp.status_code}: {_error_text(resp)}")
    return resp.json()


def _error_text(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))[:200]
    except ValueError:
        return resp.text[:200]


# --- check-ports -----------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    ok: bool | None  # None: not run, an earlier step failed
    detail: str = ""

    def line(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        return f"{status}  {self.name}" + (f": {self.detail}" if self.detail else "")


def check_ports(*, connection_file: str | None = None, port: int | None = None, token: str | None = None,
                host: str = "localhost", server: bool = False, timeout: float = 10.0) -> list[Step]:
    """Test each hop in order and stop at the first broken one; every FAIL carries its remedy."""
    info = read_connection_file(connection_file) if connection_file else {}
    token = token or info.get("token")
    uds = info.get("uds") if server else None
    if not uds:
        if port is None:
            port = (info.get("port") if server else info.get("local_port") or info.get("port")) or None
        if port is None:
            raise UserError("give --port P or --connection-file PATH")
        if server and connection_file and host == "localhost":
            host = info.get("bind_host") or "127.0.0.1"
            host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    where = uds or f"{host}:{port}"
    ssh = info.get("ssh_command") or ssh_command("<node>", port=port, bind_host="0.0.0.0", local_port=port)
    remedy = _Remedies(where=where, ssh=ssh, server=server, connection_file=connection_file, port=port)
    checks: list[tuple[str, Callable[[httpx.Client], str | None]]] = [
        ("1 something listens on " + where, lambda _c: remedy.listen() if not _listens(host, port, uds) else None),
        ("2 it is a clip-hpc server (/health)", remedy.health),
        ("3 the token is accepted", lambda c: remedy.token(c, token)),
        ("4 a test query answers", remedy.query),
    ]
    steps: list[Step] = []
    with make_client(f"http://{_url_host(host)}:{port}" if not uds else None, uds=uds, token=token,
                     timeout=timeout) as client:
        for name, check in checks:
            if steps and not steps[-1].ok:
                steps.append(Step(name, None))
                continue
            problem = check(client)
            steps.append(Step(name, problem is None, problem or ""))
    return steps


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _listens(host: str, port: int | None, uds: str | None) -> bool:
    try:
        if uds:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(uds)
        else:
            socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


@dataclass
class _Remedies:
    """Each check returns None when its hop works, else what is wrong and what to do about it."""

    where: str
    ssh: str
    server: bool
    connection_file: str | None
    port: int | None

    def listen(self) -> str:
        if self.server:
            return (f"nothing listens on {self.where} on this node: the server is not running; look at the job's "
                    f"log, then start it again (clip-hpc serve INDEX_DIR --port 0 --connection-file FILE)")
        return f"nothing listens on {self.where}: is the tunnel up? run: {self.ssh}"

    def health(self, client: httpx.Client) -> str | None:
        try:
            resp = client.get("/health")
        except httpx.HTTPError as exc:
            if self.server:
                return f"{self.where} accepts connections but does not speak HTTP ({type(exc).__name__})"
            return (f"the tunnel on {self.where} is up but nothing answers behind it ({type(exc).__name__}): is "
                    f"the server job still running (squeue --me)? do the node and port in the ssh command match "
                    f"the connection file? restart the tunnel with: {self.ssh}")
        try:
            ok = resp.status_code == 200 and resp.json() == {"status": "ok"}
        except ValueError:
            ok = False
        if ok:
            return None
        port = self.port or DEFAULT_LOCAL_PORT
        return (f"port {port} answers (HTTP {resp.status_code}) but is not clip-hpc: another program holds it, "
                f"pick another local port (e.g. ssh -N -L {port + 1}:... and check-ports --port {port + 1})")

    def token(self, client: httpx.Client, token: str | None) -> str | None:
        if not token:
            return "no token given: pass --token T or --connection-file FILE (the token is in that file)"
        resp = client.get("/api/info")
        if resp.status_code == 200:
            return None
        source = f"copy it from the connection file {self.connection_file}" if self.connection_file \
            else "copy it from the connection file (~/.clip-hpc/connections/*.json on the cluster) or the job log"
        if resp.status_code == 401:
            return f"token rejected: {source}; a restarted server has a new token"
        return f"/api/info answered HTTP {resp.status_code}: {_error_text(resp)}"

    def query(self, client: httpx.Client) -> str | None:
        try:
            resp = client.get("/api/search", params={"q": "a photo", "k": 1})
        except httpx.HTTPError as exc:
            return f"the test query did not answer ({type(exc).__name__}): the server may be overloaded; retry"
        if resp.status_code == 200 and isinstance(resp.json().get("results"), list):
            return None
        return f"the test query failed with HTTP {resp.status_code}: {_error_text(resp)}; see the server's log"
