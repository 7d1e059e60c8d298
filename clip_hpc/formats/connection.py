"""The connection file, owned here: `clip-hpc serve` writes it (host, port or socket, token, URL, ssh command), the
laptop side (`client/`) reads it. The two strings it records for the user, the ssh tunnel command and the browser
URL, are made here too, because the server writes them into the file and prints them.

Standard library only (plus clip_hpc's light modules): `clip-hpc check-ports` reads this file without torch,
FAISS, h5py or numpy."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_write_bytes
from clip_hpc.procs import pid_alive

DEFAULT_LOCAL_PORT = 8765  # what the laptop side of a unix-socket tunnel listens on
LOGIN_HOST_ENV = "CLIP_HPC_LOGIN_HOST"
LOGIN_PLACEHOLDER = "<login-node>"
CONNECTIONS_DIR = Path("~/.clip-hpc/connections")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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


@dataclass(frozen=True)
class ConnectionInfo:
    """Everything a laptop (or check-ports) needs to reach a server; the fields are the file's JSON keys, in the
    file's order (every field has a default only so that the order can stay; `from_json` insists on a token)."""

    host: str = ""
    bind_host: str | None = None
    port: int | None = None
    uds: str | None = None
    local_port: int | None = None
    token: str = ""
    pid: int | None = None
    started: str = ""
    url: str = ""
    index_dir: str = ""
    ssh_command: str = ""

    @classmethod
    def for_this_server(cls, *, token: str, port: int | None = None, uds: str | None = None,
                        bind_host: str = "127.0.0.1", index_dir: str = "") -> ConnectionInfo:
        """What this process, a server that has just bound `port` or `uds`, writes about itself."""
        node = socket.gethostname()
        local_port = port or DEFAULT_LOCAL_PORT
        return cls(host=node, bind_host=None if uds else bind_host, port=port, uds=uds, local_port=local_port,
                   token=token, pid=os.getpid(),
                   started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   url=browser_url(local_port, token), index_dir=index_dir,
                   ssh_command=ssh_command(node, port=port, uds=uds, bind_host=bind_host, local_port=local_port))

    @classmethod
    def from_json(cls, data: Any) -> ConnectionInfo | None:
        """None when `data` is not a connection (no token, or neither port nor socket); unknown keys are ignored."""
        if not isinstance(data, dict) or "token" not in data or not (data.get("port") or data.get("uds")):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def stale_reason(self) -> str | None:
        """Why this file cannot be trusted, if we can tell: on its own node, a server pid that is gone (kill -9,
        a node reboot) leaves the file behind; None when the server may be alive (or runs on another node)."""
        if self.host == socket.gethostname() and self.pid and not pid_alive(self.pid):
            return f"the server that wrote it (pid {self.pid}) is gone: the file is stale, start the server again"
        return None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def claim_connection_file(path: str | os.PathLike) -> Path:
    """Refuse a connection file that names a live server on this node (two servers on one file would leave it
    pointing at whichever wrote last); a stale one (its server is gone) is taken over."""
    path = Path(path).expanduser()
    try:
        current = ConnectionInfo.from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return path
    if current is not None and current.host == socket.gethostname() and current.pid != os.getpid() \
            and pid_alive(current.pid):
        raise UserError(f"{path} belongs to a running server (pid {current.pid}): stop it first, or give this "
                        f"server another --connection-file")
    return path


def write_connection_file(path: str | os.PathLike, info: ConnectionInfo) -> Path:
    """Mode 0600 before the token is written: the file is the key to the server."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o177)
    try:
        atomic_write_bytes(path, (json.dumps(info.to_json(), indent=2) + "\n").encode())
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return path


def read_connection_file(path: str | os.PathLike) -> ConnectionInfo:
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"connection file {path} does not exist: is the server started? (clip-hpc serve ... "
                        f"--connection-file {path})")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read connection file {path}: {exc}")
    info = ConnectionInfo.from_json(data)
    if info is None:
        raise UserError(f"{path} is not a clip-hpc connection file (no token, port or uds)")
    return info


def remove_connection_file(path: str | os.PathLike) -> None:
    """Only our own: a newer server may have taken over the same file."""
    path = Path(path).expanduser()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
