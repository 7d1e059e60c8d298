"""The laptop side's pieces: the ssh command, the connection file (private, atomic, only our own removed, clear
errors) and `resolve_endpoint`, the one place a connection file, URL or port becomes an endpoint."""

from __future__ import annotations

import json
import os
import stat

import pytest

from clip_hpc.client.endpoint import resolve_endpoint
from clip_hpc.errors import UserError
from clip_hpc.formats import connection
from clip_hpc.formats.connection import ConnectionInfo
from clip_hpc.formats.ssh_tunnel import SSH_KEY_ENV, hop_checks_for


def test_ssh_command_ends_where_the_server_listens(monkeypatch):
    monkeypatch.setenv(connection.LOGIN_HOST_ENV, "me@login1")
    monkeypatch.delenv(SSH_KEY_ENV, raising=False)
    # the node hop names the user too: without it OpenSSH logs in to the node as the laptop's user
    assert connection.ssh_command("nid001", port=9000) == "ssh -N -L 9000:localhost:9000 -J me@login1 me@nid001"
    assert (
        connection.ssh_command("nid001", port=9000, bind_host="0.0.0.0", local_port=8000)
        == "ssh -N -L 8000:nid001:9000 me@login1"
    )
    assert (
        connection.ssh_command("nid001", uds="/home/me/s.sock")
        == "ssh -N -L 8765:/home/me/s.sock -J me@login1 me@nid001"
    )
    monkeypatch.delenv(connection.LOGIN_HOST_ENV)
    assert connection.ssh_command("nid001", port=1, bind_host="0.0.0.0").endswith(" <login-node>")


def test_ssh_command_for_a_socket_path_with_spaces_can_be_pasted(monkeypatch):
    """The printed command is pasted into a shell: a --uds under "My Project/" must stay one -L argument."""
    import shlex

    monkeypatch.setenv(connection.LOGIN_HOST_ENV, "me@login1")
    monkeypatch.delenv(SSH_KEY_ENV, raising=False)
    command = connection.ssh_command("nid001", uds="/home/me/My Project/s.sock")
    assert shlex.split(command) == [
        "ssh",
        "-N",
        "-L",
        "8765:/home/me/My Project/s.sock",
        "-J",
        "me@login1",
        "me@nid001",
    ]


def test_ssh_command_with_the_profiles_key_gives_it_to_both_hops(monkeypatch):
    """`-J` hands -i to the last hop only (its jump ssh starts without it): with a key the jump is a ProxyCommand
    that carries the key and the user; a ~/ path stays unquoted for the laptop's shell to expand."""
    import shlex

    monkeypatch.setenv(connection.LOGIN_HOST_ENV, "me@perlmutter.nersc.gov")
    monkeypatch.setenv(SSH_KEY_ENV, "~/.ssh/nersc")
    command = connection.ssh_command("nid001234", port=9000)
    assert command == (
        "ssh -N -L 9000:localhost:9000 -i ~/.ssh/nersc "
        "-o 'ProxyCommand=ssh -i ~/.ssh/nersc -W %h:%p me@perlmutter.nersc.gov' me@nid001234"
    )
    words = shlex.split(command)
    assert words[-1] == "me@nid001234" and words[words.index("-i") + 1] == "~/.ssh/nersc"
    proxy = shlex.split(words[-2].split("=", 1)[1])
    assert proxy == ["ssh", "-i", "~/.ssh/nersc", "-W", "%h:%p", "me@perlmutter.nersc.gov"]
    forwarded = connection.ssh_command("nid001234", port=9000, bind_host="0.0.0.0")
    assert forwarded == "ssh -N -L 9000:nid001234:9000 -i ~/.ssh/nersc me@perlmutter.nersc.gov"
    monkeypatch.setenv(SSH_KEY_ENV, "/home/me/my keys/nersc")
    assert "-i '/home/me/my keys/nersc'" in connection.ssh_command("nid001234", port=9000)


def test_hop_checks_name_each_hop_of_the_printed_command(monkeypatch):
    monkeypatch.setenv(connection.LOGIN_HOST_ENV, "me@login1:2222")
    for key, first, second in (
        ("", "ssh -p 2222 me@login1 true", "ssh -J me@login1:2222 me@nid001 true"),
        (
            "~/.ssh/nersc",
            "ssh -i ~/.ssh/nersc -p 2222 me@login1 true",
            "ssh -i ~/.ssh/nersc -o 'ProxyCommand=ssh -i ~/.ssh/nersc -p 2222 -W %h:%p me@login1' me@nid001 true",
        ),
    ):
        monkeypatch.setenv(SSH_KEY_ENV, key)
        hops = hop_checks_for(connection.ssh_command("nid001", port=9000))
        assert hops == [f"hop 1 laptop -> login1: {first}", f"hop 2 login1 -> nid001: {second}"]
    forwarded = hop_checks_for(connection.ssh_command("nid001", port=9000, bind_host="0.0.0.0"))
    assert forwarded == ["hop 1 laptop -> login1: ssh -i ~/.ssh/nersc -p 2222 me@login1 true"]
    assert hop_checks_for("not ssh") == [] and hop_checks_for("ssh 'unbalanced") == []


def test_connection_file_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        info = ConnectionInfo.for_this_server(token="t0k", port=1234)
        path = connection.write_connection_file(tmp_path / "deep" / "c.json", info)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = connection.read_connection_file(path)
    assert back.token == "t0k" and back.port == 1234 and back.pid == os.getpid()
    assert back.url == "http://localhost:1234/?token=t0k" and "1234" in back.ssh_command
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]  # no temporary left behind
    connection.remove_connection_file(path)
    assert not path.exists()


def test_someone_elses_connection_file_is_left_alone(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"token": "x", "port": 1, "pid": os.getpid() + 1}))
    connection.remove_connection_file(path)
    assert path.exists()


@pytest.mark.parametrize(
    "content,message",
    [(None, "does not exist"), ("{not json", "cannot read"), ('{"port": 1}', "not a clip-hpc connection file")],
)
def test_bad_connection_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        connection.read_connection_file(path)


def test_connection_file_keeps_its_json_keys(tmp_path):
    path = connection.write_connection_file(tmp_path / "c.json", ConnectionInfo.for_this_server(token="t", uds="/s"))
    assert list(json.loads(path.read_text())) == [
        "host",
        "bind_host",
        "port",
        "uds",
        "local_port",
        "token",
        "pid",
        "process_start",
        "started",
        "url",
        "index_dir",
        "ssh_command",
    ]


def _file(tmp_path, **fields) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"token": "tok", **fields}))
    return str(path)


def test_endpoint_on_the_laptop_is_the_tunnel_end(tmp_path):
    conn = _file(tmp_path, port=9000, local_port=8000, bind_host="0.0.0.0")
    ep = resolve_endpoint(connection_file=conn)
    assert (ep.base_url, ep.uds, ep.token, ep.where) == ("http://localhost:8000", None, "tok", "localhost:8000")
    assert resolve_endpoint(connection_file=conn, token="mine").token == "mine"
    assert resolve_endpoint(connection_file=conn, port=7000).base_url == "http://localhost:7000"


def test_endpoint_on_the_node_is_the_servers_own_port_or_socket(tmp_path):
    wildcard = resolve_endpoint(
        connection_file=_file(tmp_path, port=9000, local_port=8000, bind_host="0.0.0.0"), server=True
    )
    assert wildcard.base_url == "http://127.0.0.1:9000" and wildcard.port == 9000
    ep = resolve_endpoint(
        connection_file=_file(tmp_path, uds="/run/s.sock", port=None, local_port=8765),
        server=True,
        url="http://ignored",
    )
    assert (ep.base_url, ep.uds, ep.where, ep.port) == ("http://localhost", "/run/s.sock", "/run/s.sock", None)


def test_endpoint_from_a_url_or_a_port():
    ep = resolve_endpoint(url="http://localhost:8765/?token=abc", token="t")
    assert (ep.base_url, ep.token, ep.info) == ("http://localhost:8765", "t", None)
    assert resolve_endpoint(port=5, host="::1").base_url == "http://[::1]:5"
    with pytest.raises(UserError, match=r"^give --url URL \(and --token\) or --connection-file PATH$"):
        resolve_endpoint(token="t")
    with pytest.raises(UserError, match="^give --port P or --connection-file PATH$"):
        resolve_endpoint(ask_for="--port P")


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"port": "abc"}, r"'port' is 'abc': expected a port number 1-65535"),
        ({"port": 99999}, r"'port' is 99999: expected a port number 1-65535"),
        ({"port": 8765, "local_port": "x"}, r"'local_port' is 'x'"),
        ({"port": 8765, "pid": "abc"}, r"'pid' is 'abc': expected a process id"),
        ({"port": 8765, "host": 7}, r"'host' is 7: expected a string"),
        ({"uds": ["/s"]}, r"'uds' is \['/s'\]: expected a string"),
    ],
)
def test_connection_file_fields_of_the_wrong_type_are_one_line_errors(tmp_path, fields, message):
    """A hand-edited or half-copied file: one line naming the field, never a traceback in check-ports."""
    with pytest.raises(UserError, match=r"^.*c\.json: " + message):
        connection.read_connection_file(_file(tmp_path, **fields))


def test_a_token_of_the_wrong_type_is_named_without_its_value(tmp_path):
    with pytest.raises(UserError, match="'token' is not a string") as err:
        connection.read_connection_file(_file(tmp_path, port=1, token=["secret-value"]))
    assert "secret-value" not in str(err.value)


def test_a_port_out_of_range_is_a_one_line_error():
    for port in (0, -1, 70000):
        with pytest.raises(UserError, match=f"^port {port} is not a port number: give one in 1-65535$"):
            resolve_endpoint(port=port, token="t")


def _started_at(seconds_ago: float) -> str:
    import datetime as dt

    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago)
    return when.isoformat(timespec="seconds")


def test_a_pid_reused_by_a_later_process_is_not_the_server(tmp_path):
    """After a kill -9 the file's pid is soon another process's: it neither blocks a new server nor looks alive."""
    import socket
    import subprocess
    import sys

    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = tmp_path / "c.json"
        path.write_text(
            json.dumps(
                {"host": socket.gethostname(), "token": "t", "port": 1, "pid": later.pid, "started": _started_at(3600)}
            )
        )
        assert connection.claim_connection_file(path) == path
        assert "is gone" in connection.read_connection_file(path).stale_reason()
        path.write_text(
            json.dumps(
                {"host": socket.gethostname(), "token": "t", "port": 1, "pid": later.pid, "started": _started_at(-5)}
            )
        )  # written after that process started: its own
        with pytest.raises(UserError, match="belongs to a running server"):
            connection.claim_connection_file(path)
        assert connection.read_connection_file(path).stale_reason() is None
    finally:
        later.kill()
        later.wait()


def test_a_file_claimed_by_another_live_server_meanwhile_is_not_overwritten(tmp_path):
    """Two servers started together on one --connection-file both pass the claim before loading; the one that is
    ready second must refuse rather than silently run with no file pointing at it."""
    import socket
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = tmp_path / "c.json"
        path.write_text(
            json.dumps(
                {"host": socket.gethostname(), "token": "t", "port": 1, "pid": other.pid, "started": _started_at(-5)}
            )
        )
        with pytest.raises(UserError, match="belongs to a running server"):
            connection.write_connection_file(path, ConnectionInfo.for_this_server(token="mine", port=2))
        assert json.loads(path.read_text())["pid"] == other.pid
    finally:
        other.kill()
        other.wait()


def test_a_connection_file_that_cannot_be_written_is_refused_at_the_claim(tmp_path):
    """serve claims the file before loading the model and index: an unwritable place ($HOME on a read-only or
    missing mount, a file where a directory should be) must fail there, in one line naming the option to use,
    not minutes later with a bare 'No such file or directory'."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    for path in (blocker / "c.json", "/proc/clip-hpc-nonexistent/connections/c.json"):
        with pytest.raises(
            UserError,
            match=r"^cannot write the connection file .*c\.json .*: give "
            r"--connection-file PATH in a writable directory$",
        ):
            connection.claim_connection_file(path)
