"""Binding the server's listening socket before anyone is told where it is: a TCP port (port 0 picks a free one
without a race) or a unix socket that is mode 0600 from birth."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from clip_hpc.errors import UserError

UNIX_PATH_MAX = 107  # bytes in sockaddr_un.sun_path on Linux, less the terminating NUL
LISTEN_BACKLOG = 2048  # connections the kernel queues while the server is busy: a burst waits, it is not reset


class ListeningSocket(socket.socket):
    """A listening socket whose kernel queue never shrinks below LISTEN_BACKLOG. asyncio calls `listen()` again
    with uvicorn's `backlog`, which it also uses as the number of connections it accepts per wake-up (kept small,
    so the connection cap can act): without this, that second call cut the queue to 8 and a burst of 60
    connections waited 1-1.4 s each, with resets."""

    def listen(self, backlog: int = LISTEN_BACKLOG) -> None:
        super().listen(max(backlog, LISTEN_BACKLOG))


def check_port(port: int) -> int:
    """0-65535 (0: any free one), refused before the model and index load: bind() would fail after minutes."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number (0-65535; 0 picks a free one)")
    return port


def check_bind_host(host: str) -> str:
    """The address to bind, refused when blank: bind(("", port)) listens on every interface, so an unset shell
    variable (`--host "$BIND"`) would open the server to the network without anyone asking for it."""
    if not host.strip():
        raise UserError("--host is empty: leave it out for 127.0.0.1, or give 0.0.0.0 to listen on every interface")
    return host


def bind_tcp(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind and listen before anyone is told the port: `--port 0` then cannot race another process.

    The protocol is spelled IPPROTO_TCP (not 0): asyncio turns TCP_NODELAY on for accepted connections only when
    `sock.proto` says TCP, and without it every response on a reused connection waits ~40 ms for Nagle."""
    family = socket.AF_INET6 if ":" in check_bind_host(host) else socket.AF_INET
    sock = ListeningSocket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Linux hands it on to accepted sockets too
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is taken: pick another with --port, or --port 0 for a free one"
            ) from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen()
    return sock


def unix_socket_path(path: str | os.PathLike) -> Path:
    """The absolute --uds path, refused when the kernel cannot hold it: bind() would say only "AF_UNIX path too
    long", after the model had loaded, and after making the directory for it. Cheap: `serve` calls it first."""
    path = Path(path).expanduser().absolute()
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise UserError(
            f"--uds path {path} is {size} bytes; a unix socket path holds at most {UNIX_PATH_MAX}: "
            f"choose a shorter one (e.g. under /tmp)"
        )
    return path


def bind_unix(path: str | os.PathLike) -> socket.socket:
    """A unix socket with mode 0600 from birth (umask), so no other user on the node can ever connect."""
    path = unix_socket_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise UserError(f"{path} exists and is not a socket: choose another --uds path")
        if _unix_answers(path):
            raise UserError(f"a server already listens on {path}: stop it or choose another --uds path")
        path.unlink()
    sock = ListeningSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen()
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
