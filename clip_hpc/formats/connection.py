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
from clip_hpc.formats.ssh_tunnel import tunnel_command
from clip_hpc.procs import pid_alive, process_start, process_started_at, same_process_alive

DEFAULT_LOCAL_PORT = 8765  # what the laptop side of a unix-socket tunnel listens on
LOGIN_HOST_ENV = "CLIP_HPC_LOGIN_HOST"
LOGIN_PLACEHOLDER = "<login-node>"
CONNECTIONS_DIR = Path("~/.clip-hpc/connections")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PORT_FIELDS = ("port", "local_port")
STRING_FIELDS = ("host", "bind_host", "uds", "process_start", "started", "url", "index_dir", "ssh_command")
START_SLACK_S = 2.0  # `started` is whole seconds, written after the process began: later by this much, another one


def field_problem(name: str, value: Any) -> str | None:
    """What is wrong with one connection-file field, if anything (None and a missing field are fine). A field of
    the wrong type (a hand edit, a file from elsewhere) would otherwise surface as a traceback deep in a client.
    The token's value is never repeated: it is the key to the server."""
    if value is None:
        return None
    if name in PORT_FIELDS and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535):
        return f"{name!r} is {value!r}: expected a port number 1-65535"
    if name == "pid" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        return f"{name!r} is {value!r}: expected a process id"
    if name in STRING_FIELDS and not isinstance(value, str):
        return f"{name!r} is {value!r}: expected a string"
    if name == "token" and not isinstance(value, str):
        return f"{name!r} is not a string"
    return None


def login_host() -> str:
    return os.environ.get(LOGIN_HOST_ENV) or LOGIN_PLACEHOLDER


def ssh_command(
    node: str,
    *,
    port: int | None = None,
    uds: str | None = None,
    bind_host: str = "127.0.0.1",
    local_port: int | None = None,
    login: str | None = None,
    key: str | None = None,
) -> str:
    """The tunnel that reaches this server from a laptop, with the user (and the profile's key,
    $CLIP_HPC_SSH_KEY) on every hop (formats/ssh_tunnel.py).

    A server bound to the node's loopback or a unix socket is only reachable from the node itself, so the tunnel
    must end there (`-J` hops through the login node); a server bound to the node's network interface can be
    forwarded by the login node directly.
    """
    login = login or login_host()
    local = local_port or port or DEFAULT_LOCAL_PORT
    if uds:  # quoted (in tunnel_command): the command is pasted into a shell, and a socket path may hold spaces
        return tunnel_command(f"{local}:{uds}", login, node, key)
    if bind_host in LOOPBACK:
        return tunnel_command(f"{local}:localhost:{port}", login, node, key)
    return tunnel_command(f"{local}:{node}:{port}", login, None, key)


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
    process_start: str | None = None  # `procs.process_start` of `pid`: with it, the pid names one process for good
    started: str = ""
    url: str = ""
    index_dir: str = ""
    ssh_command: str = ""

    @classmethod
    def for_this_server(
        cls,
        *,
        token: str,
        port: int | None = None,
        uds: str | None = None,
        bind_host: str = "127.0.0.1",
        index_dir: str = "",
    ) -> ConnectionInfo:
        """What this process, a server that has just bound `port` or `uds`, writes about itself."""
        node = socket.gethostname()
        local_port = port or DEFAULT_LOCAL_PORT
        return cls(
            host=node,
            bind_host=None if uds else bind_host,
            port=port,
            uds=uds,
            local_port=local_port,
            token=token,
            pid=os.getpid(),
            process_start=process_start(os.getpid()),
            started=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            url=browser_url(local_port, token),
            index_dir=index_dir,
            ssh_command=ssh_command(node, port=port, uds=uds, bind_host=bind_host, local_port=local_port),
        )

    @classmethod
    def from_json(cls, data: Any) -> ConnectionInfo | None:
        """None when `data` is not a connection (no token, or neither port nor socket); unknown keys are ignored;
        a known field of the wrong type is a UserError that names it."""
        if not isinstance(data, dict) or "token" not in data or not (data.get("port") or data.get("uds")):
            return None
        known = [f.name for f in dataclasses.fields(cls)]
        problems = [p for p in (field_problem(k, data.get(k)) for k in known) if p]
        if problems:
            raise UserError("; ".join(problems))
        return cls(**{k: v for k, v in data.items() if k in known})

    def stale_reason(self) -> str | None:
        """Why this file cannot be trusted, if we can tell: on its own node, a server pid that is gone (kill -9,
        a node reboot) leaves the file behind; None when the server may be alive (or runs on another node)."""
        if self.host == socket.gethostname() and self.pid and not self.server_alive():
            return f"the server that wrote it (pid {self.pid}) is gone: the file is stale, start the server again"
        return None

    def server_alive(self) -> bool:
        """Whether the process that wrote this file, on this node, still runs. A pid alone is not enough: after a
        kill -9 the pid is soon another process's, which neither blocks a new server nor passes for one in
        check-ports. The recorded `process_start` tells (`procs.same_process_alive`, as `IndexDir` builds do);
        files from before it hold only `started`: a process that began after that time (the server writes the
        file only after loading) is not the server."""
        if self.pid and self.process_start is not None:
            return same_process_alive(self.pid, self.process_start)
        if not pid_alive(self.pid):
            return False
        began = process_started_at(self.pid) if self.pid else None
        try:
            written = _dt.datetime.fromisoformat(self.started).timestamp()
        except (TypeError, ValueError):
            return True  # no usable time recorded: the pid is all there is to go on
        return began is None or began <= written + START_SLACK_S

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def claim_connection_file(path: str | os.PathLike) -> Path:
    """Refuse a connection file that names a live server on this node (two servers on one file would leave it
    pointing at whichever wrote last); a stale one (its server is gone) is taken over. Its directory is made (and
    must be writable) here, because serve claims before loading: an unwritable $HOME fails in seconds, not after
    the model and index have loaded."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise UserError(
            f"cannot write the connection file {path} ({exc.strerror or exc}): give --connection-file "
            f"PATH in a writable directory"
        ) from None
    try:
        current = ConnectionInfo.from_json(json.loads(path.read_text()))
    except (OSError, ValueError):  # missing, unreadable or malformed (UserError is a ValueError): ours to take
        return path
    if (
        current is not None
        and current.host == socket.gethostname()
        and current.pid != os.getpid()
        and current.server_alive()
    ):
        raise UserError(
            f"{path} belongs to a running server (pid {current.pid}): stop it first, or give this "
            f"server another --connection-file"
        )
    return path


def write_connection_file(path: str | os.PathLike, info: ConnectionInfo) -> Path:
    """Mode 0600 before the token is written: the file is the key to the server. The claim is checked again here:
    two servers started together on one file both pass `claim_connection_file` before loading, and the one ready
    second would otherwise replace the first's file and leave a server that no file points to."""
    path = claim_connection_file(path)  # also makes its directory
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
        raise UserError(
            f"connection file {path} does not exist: is the server started? (clip-hpc serve ... "
            f"--connection-file {path})"
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read connection file {path}: {exc}") from None
    try:
        info = ConnectionInfo.from_json(data)
    except UserError as exc:
        raise UserError(
            f"bad connection file {path}: {exc} (copy it again from the cluster, or start the server again)"
        ) from None
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
