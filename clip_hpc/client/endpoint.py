"""Where a server is and how to get in: the one place a connection file, a URL or a port (plus a token) becomes
a base URL, a unix socket and a token. `server=True` means "I am on the node itself", which reaches the server's
own port or socket; otherwise the laptop's end of the tunnel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from clip_hpc.errors import UserError
from clip_hpc.formats.connection import ConnectionInfo, read_connection_file

WILDCARD = ("0.0.0.0", "::")


@dataclass(frozen=True)
class Endpoint:
    """A server as a client reaches it; `info` is the connection file it was read from, if any."""

    base_url: str
    uds: str | None = None
    token: str | None = None
    info: ConnectionInfo | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or "localhost"

    @property
    def port(self) -> int | None:
        return None if self.uds else urlsplit(self.base_url).port

    @property
    def where(self) -> str:
        """What a message names: the socket path, or host:port."""
        return self.uds or f"{self.host}:{self.port}"


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def resolve_endpoint(
    *,
    connection_file: str | os.PathLike | None = None,
    url: str | None = None,
    port: int | None = None,
    host: str = "localhost",
    token: str | None = None,
    server: bool = False,
    ask_for: str = "--url URL (and --token)",
) -> Endpoint:
    """An explicit URL or port wins over the file's; on the node a socket in the file wins over both.

    `ask_for` names the option the caller's command offers, for the error when nothing says where to go.
    """
    info = read_connection_file(connection_file) if connection_file else None
    token = token or (info.token if info else None)
    if info and server and info.uds:
        return Endpoint("http://localhost", info.uds, token, info)
    if url:
        return Endpoint(url.split("?")[0].rstrip("/") or url, None, token, info)
    if port is None and info:
        port = info.port if server else info.local_port or info.port
    if port is None:
        raise UserError(f"give {ask_for} or --connection-file PATH")
    if not 1 <= port <= 65535:  # urllib would raise a bare ValueError (a traceback) when the URL is used
        raise UserError(f"port {port} is not a port number: give one in 1-65535")
    if server and info and host == "localhost":
        host = info.bind_host or "127.0.0.1"
        host = "127.0.0.1" if host in WILDCARD else host
    return Endpoint(f"http://{url_host(host)}:{port}", None, token, info)
