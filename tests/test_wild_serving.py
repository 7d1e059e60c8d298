"""The serving findings of the wild-data red team: batched searches that came back short (N6), a listen queue cut
to 8 (N7), path prefixes at the ends of Unicode (N11) and the connection cap evicting a working client (N12).
Real `clip-hpc serve` processes on 127.0.0.1; ~30 s."""

from __future__ import annotations

import io
import json
import resource
import socket
import subprocess
import tarfile
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from clip_hpc.search.engine import SearchEngine
from conftest import run_cli
from index_fixtures import synthetic_emb_dir
from server_fixtures import start_server


def test_n6_batched_search_widens_like_a_single_search(tmp_path):
    emb, _ = synthetic_emb_dir(tmp_path / "emb", 2000, dim=32, clusters=40)
    run_cli(
        "index", emb, "--out", tmp_path / "index", "--index-key", "IVF32,Flat", "--nprobe", "1", "--quiet", check=True
    )
    engine = SearchEngine(tmp_path / "index", model_name="clip-hpc-tiny", pretrained="none")
    try:
        queries = engine.vectors_for_ids([5, 700, 1900])
        batched = engine.search_batch(queries, [1000, 10, 5000])
        assert [len(hits) for hits in batched] == [1000, 10, 2000]
        for query, k, hits in zip(queries, [1000, 10, 5000], batched):
            assert hits == engine.search_vectors(query[None], k)[0]  # a row gets what it gets searched alone
    finally:
        engine.close()


def kernel_backlog(port: int) -> int:
    """The listening socket's queue length as the kernel has it (`ss`: Send-Q of a listening socket)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert rows, f"nothing listens on {port}: {out!r}"
    return int(rows[0][2])


def test_n7_the_listen_backlog_asked_for_is_the_kernels(served_index, tmp_path):
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with start_server(served_index, tmp_path / "srv", "--port", "0") as srv, srv.client() as c:
        assert c.get("/health").status_code == 200  # uvicorn has run its listen() by now
        assert kernel_backlog(srv.port) == min(2048, somaxconn)


@pytest.mark.parametrize("prefix", ["\U0010ffff", "\ud7ff", "a\U0010ffff\U0010ffff", "\ud800", "x\udfff/"])
def test_n11_path_prefix_at_the_ends_of_unicode_is_a_result_or_a_4xx(live_server, prefix):
    with live_server.client() as c:
        body = json.dumps({"text": "a photo", "k": 3, "filters": {"path_prefix": prefix}})  # \\ud800: valid JSON
        post = c.post("/api/search", content=body, headers={"content-type": "application/json"})
        get = c.get(f"/api/search?q=a+photo&path_prefix={quote(prefix.encode('utf-8', 'surrogatepass'))}")
    for resp in (post, get):
        assert resp.status_code == 200 or 400 <= resp.status_code < 500, (resp.status_code, resp.text[:200])
        assert resp.headers["content-type"].startswith("application/json"), resp.text[:200]
        if resp.status_code == 200:
            assert resp.json()["results"] == []  # no indexed path starts with these
        else:
            assert "error" in resp.json()


def lower_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def ask_health(sock: socket.socket) -> bytes:
    """One keep-alive `GET /health` on a raw socket; the response's first line, or b'' if the server closed it."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return b""
    return data.split(b"\r\n", 1)[0]


def test_n12_at_the_connection_cap_idle_sockets_go_before_a_working_client(served_index, tmp_path):
    with start_server(served_index, tmp_path / "srv", "--port", "0", preexec=lower_fd_limit) as srv:
        working = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        idle: list[socket.socket] = []
        try:
            assert ask_health(working) == b"HTTP/1.1 200 OK"  # it has completed a request: a working client
            for _ in range(300):  # far past the cap a 256-descriptor process can hold
                idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=20))
            with srv.client() as c:  # accepted after every idle one (the queue is FIFO): all were seen by now
                assert c.get("/health").status_code == 200
            assert ask_health(working) == b"HTTP/1.1 200 OK", "the kept-alive client was evicted before idle sockets"
        finally:
            working.close()
            for sock in idle:
                sock.close()


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data))


def small_jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(out, "JPEG")
    return out.getvalue()


def test_n9_a_tar_replaced_after_indexing_is_a_404_not_other_bytes(tmp_path):
    images = [
        ("a.jpg", small_jpeg((200, 10, 10))),
        ("dir/" + "long" * 30 + ".jpg", small_jpeg((10, 200, 10))),
        ("\u00fcmlaut \u2028 b.jpg", small_jpeg((10, 10, 200))),
    ]
    tar = tmp_path / "tars" / "00000.tar"
    tar.parent.mkdir()
    write_tar(tar, images)
    run_cli(
        "embed",
        tar.parent,
        "--out",
        tmp_path / "emb",
        "--model",
        "clip-hpc-tiny",
        "--pretrained",
        "none",
        "--workers",
        "0",
        check=True,
    )
    run_cli("index", tmp_path / "emb", "--out", tmp_path / "index", "--quiet", check=True)
    secret = b"SECRET " * 500
    with start_server(tmp_path / "index", tmp_path / "srv") as srv, srv.client() as c:
        served = {i: c.get(f"/api/images/{i}") for i in range(len(images))}
        assert [r.status_code for r in served.values()] == [200] * len(images)  # long and non-ASCII names too
        assert sorted(r.content for r in served.values()) == sorted(data for _, data in images)
        write_tar(tar, images)  # rewritten the same: still served
        assert all(c.get(f"/api/images/{i}").content == served[i].content for i in served)
        write_tar(tar, [("z_secret.txt", secret[: len(images[0][1])]), *images])  # a new first member
        for i in served:
            for url in (f"/api/images/{i}", f"/api/images/{i}/thumb"):
                resp = c.get(url)
                assert resp.status_code == 404 and "changed after indexing" in resp.json()["error"], resp.text[:300]
            resp = c.post("/api/export", json={"ids": [i]})
            assert resp.status_code == 404 and b"SECRET" not in resp.content
