"""The server's listening sockets: a taken port is a clear error, a unix socket is private from birth and a stale
one is replaced."""

from __future__ import annotations

import stat

import pytest

from clip_hpc.errors import UserError
from clip_hpc.server import sockets


def test_ports_and_sockets(tmp_path):
    with sockets.bind_tcp("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} .* is taken"):
            sockets.bind_tcp("127.0.0.1", port)
    assert 1024 <= sockets.free_port() <= 65535

    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    with pytest.raises(UserError, match="not a socket"):
        sockets.bind_unix(not_a_socket)
    path = tmp_path / "live.sock"
    with sockets.bind_unix(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(UserError, match="already listens"):
            sockets.bind_unix(path)
    with sockets.bind_unix(path):  # a stale socket (its server gone) is replaced
        assert path.is_socket()


def test_tcp_connections_have_nagle_off():
    """asyncio (hence uvicorn) sets TCP_NODELAY on accepted connections only when the listening socket says TCP;
    with Nagle on, each response on a kept-alive connection waits ~40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    listener = sockets.bind_tcp("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    async def accepted_side_nodelay() -> int:
        seen: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=listener)
        async with server:
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            await reader.read()  # EOF once the server side has looked and closed
            writer.close()
        return seen[0]

    assert asyncio.run(accepted_side_nodelay())


def test_a_unix_socket_path_too_long_is_named_and_leaves_nothing(tmp_path):
    """sun_path holds 107 bytes: a deep project directory on a cluster file system exceeds it easily. The error
    names the path, its length and the way out, and no directory is made for a socket that cannot exist."""
    deep = tmp_path / ("d" * 120)
    with pytest.raises(
        UserError,
        match=r"^--uds path .* is \d+ bytes; a unix socket path holds at most 107: "
        r"choose a shorter one \(e\.g\. under /tmp\)$",
    ):
        sockets.bind_unix(deep / "s.sock")
    assert not deep.exists()


def test_serve_refuses_a_bad_port_or_socket_path_before_loading(tmp_path):
    """Checked before the model and index load (minutes for a real one), with a one-line error."""
    from conftest import run_cli

    for args, message in (
        (["--port", "70000"], "--port 70000 is not a port number (0-65535"),
        (["--port", "-1"], "--port -1 is not a port number (0-65535"),
        (["--uds", str(tmp_path / ("d" * 120) / "s.sock")], "a unix socket path holds at most"),
        (["--host", ""], "--host is empty"),
    ):
        proc = run_cli("serve", tmp_path / "no-index", *args, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_refused_not_every_interface(host):
    """bind(("", port)) listens on every interface: `--host "$UNSET_VAR"` must not open the server to the network."""
    with pytest.raises(UserError, match="--host is empty: .* 0.0.0.0 to listen on every interface"):
        sockets.bind_tcp(host, 0)
