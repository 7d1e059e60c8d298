"""`check_ports`: which hop of the chain browser -> laptop port -> ssh tunnel -> node port or unix socket ->
clip-hpc server is broken, and how to fix it. Each step tests one more hop, so the first FAIL names the broken one."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from clip_hpc.client.endpoint import Endpoint, resolve_endpoint
from clip_hpc.client.http_client import client_for, error_text
from clip_hpc.formats.connection import DEFAULT_LOCAL_PORT, ssh_command
from clip_hpc.formats.ssh_tunnel import hop_checks_for


@dataclass
class Step:
    name: str
    ok: bool | None  # None: not run, an earlier step failed
    detail: str = ""

    def line(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        return f"{status}  {self.name}" + (f": {self.detail}" if self.detail else "")


def check_ports(
    *,
    connection_file: str | os.PathLike | None = None,
    port: int | None = None,
    token: str | None = None,
    host: str = "localhost",
    server: bool = False,
    timeout: float = 10.0,
) -> list[Step]:
    """Test each hop in order and stop at the first broken one; every FAIL carries its remedy."""
    endpoint = resolve_endpoint(
        connection_file=connection_file, port=port, host=host, token=token, server=server, ask_for="--port P"
    )
    info = endpoint.info
    ssh = (info.ssh_command if info else "") or ssh_command(
        "<node>", port=endpoint.port, bind_host="0.0.0.0", local_port=endpoint.port
    )
    remedy = _Remedies(
        where=endpoint.where,
        ssh=ssh,
        server=server,
        connection_file=str(connection_file) if connection_file else None,
        port=endpoint.port,
    )
    checks: list[tuple[str, Callable[[httpx.Client], str | None]]] = [
        (
            "1 something listens on " + endpoint.where,
            lambda _c: None if _listens(endpoint) else remedy.listen(info.stale_reason() if info else None),
        ),
        ("2 it is a clip-hpc server (/health)", remedy.health),
        ("3 the token is accepted", lambda c: remedy.token(c, endpoint.token)),
        ("4 a test query answers", remedy.query),
    ]
    steps: list[Step] = []
    with client_for(endpoint, timeout=timeout) as client:
        for name, check in checks:
            if steps and not steps[-1].ok:
                steps.append(Step(name, None))
                continue
            problem = check(client)
            steps.append(Step(name, problem is None, problem or ""))
    return steps


def _listens(endpoint: Endpoint) -> bool:
    try:
        if endpoint.uds:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(endpoint.uds)
        else:
            socket.create_connection((endpoint.host, endpoint.port), timeout=5).close()
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

    def listen(self, stale: str | None = None) -> str:
        if stale:
            return f"nothing listens on {self.where}; {stale}"
        if self.server:
            return (
                f"nothing listens on {self.where} on this node: the server is not running; look at the job's "
                f"log, then start it again (clip-hpc serve INDEX_DIR --port 0 --connection-file FILE)"
            )
        hops = hop_checks_for(self.ssh)
        tests = f"; if ssh fails, find the failing hop, one at a time: {'; '.join(hops)}" if hops else ""
        return f"nothing listens on {self.where}: is the tunnel up? run: {self.ssh}{tests}"

    def health(self, client: httpx.Client) -> str | None:
        try:
            resp = client.get("/health")
        except httpx.HTTPError as exc:
            if self.server:
                return f"{self.where} accepts connections but does not speak HTTP ({type(exc).__name__})"
            return (
                f"the tunnel on {self.where} is up but nothing answers behind it ({type(exc).__name__}): the ssh "
                f"hops work, the last one (the node to the server's port) does not: is "
                f"the server job still running (squeue --me)? do the node and port in the ssh command match "
                f"the connection file? restart the tunnel with: {self.ssh}"
            )
        try:
            ok = resp.status_code == 200 and resp.json() == {"status": "ok"}
        except ValueError:
            ok = False
        if ok:
            return None
        port = self.port or DEFAULT_LOCAL_PORT
        return (
            f"port {port} answers (HTTP {resp.status_code}) but is not clip-hpc: another program holds it, "
            f"pick another local port (e.g. ssh -N -L {port + 1}:... and check-ports --port {port + 1})"
        )

    def token(self, client: httpx.Client, token: str | None) -> str | None:
        if not token:
            return "no token given: pass --token T or --connection-file FILE (the token is in that file)"
        try:
            resp = client.get("/api/info")
        except httpx.HTTPError as exc:  # it answered /health a moment ago: it died or hung between the steps
            return (
                f"the server stopped answering after its health check ({type(exc).__name__}): is the job still "
                f"running (squeue --me)? look at its log"
            )
        if resp.status_code == 200:
            return None
        source = (
            f"copy it from the connection file {self.connection_file}"
            if self.connection_file
            else "copy it from the connection file (~/.clip-hpc/connections/*.json on the cluster) or the job log"
        )
        if resp.status_code == 401:
            return f"token rejected: {source}; a restarted server has a new token"
        return f"/api/info answered HTTP {resp.status_code}: {error_text(resp)}"

    def query(self, client: httpx.Client) -> str | None:
        try:
            resp = client.get("/api/search", params={"q": "a photo", "k": 1})
        except httpx.HTTPError as exc:
            return f"the test query did not answer ({type(exc).__name__}): the server may be overloaded; retry"
        try:
            answered = resp.status_code == 200 and isinstance(resp.json().get("results"), list)
        except (ValueError, AttributeError):  # not JSON, or JSON of another shape
            answered = False
        if answered:
            return None
        return f"the test query failed with HTTP {resp.status_code}: {error_text(resp)}; see the server's log"
