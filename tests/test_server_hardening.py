"""The server against the red-team list: idle connections (B3), huge uploads (B4), unreadable and swapped files
(B5, D1, D4), export copies (D3), the cookie (D2), HEAD, weight overflow. Real `clip-hpc serve` processes.

Cost: ~40 s (one small index, four short-lived servers; the RSS test decodes four 9400x9400 PNGs)."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import resource
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

from clip_hpc.search.engine import SearchEngine
from conftest import make_images, run_cli
from index_fixtures import synthetic_emb_dir
from server_fixtures import start_server


@pytest.fixture(scope="module")
def own_index(tmp_path_factory) -> Path:
    """A small index of its own: these tests replace and chmod its files."""
    root = tmp_path_factory.mktemp("hardening")
    make_images(root / "images", 12)
    run_cli(
        "embed",
        root / "images",
        "--out",
        root / "emb",
        "--model",
        "clip-hpc-tiny",
        "--pretrained",
        "none",
        "--shard-size",
        "50",
        "--workers",
        "0",
        check=True,
    )
    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    return root


def indexed(root: Path) -> dict[int, Path]:
    engine = SearchEngine(root / "index", encoder=None, model_name="clip-hpc-tiny", pretrained="none")
    try:
        return {i: Path(engine.path_of(i)) for i in engine.meta.all_ids()}
    finally:
        engine.close()


def drop_all_capabilities() -> None:
    """preexec: root without CAP_DAC_OVERRIDE & co., so file modes bind it as they bind a user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; EINVAL past the last capability
            break


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def tmpdir_env(tmp_path) -> tuple[dict, Path]:
    """The server's TMPDIR, so a leftover export ZIP is seen without other jobs' /tmp in the way."""
    tmp = tmp_path / "server-tmp"
    tmp.mkdir()
    return {"TMPDIR": str(tmp)}, tmp


def test_symlinks_out_of_the_tree_and_system_files_are_never_served(own_index, tmp_path, tmpdir_env):  # D1
    paths = indexed(own_index)
    (a, path_a), (b, path_b), (inside, path_c) = list(paths.items())[:3]
    path_a.unlink()
    path_a.symlink_to("/etc/passwd")
    path_b.unlink()
    path_b.symlink_to("/proc/self/environ")
    real_c = path_c.rename(path_c.with_name("real-" + path_c.name))  # its own bytes, now behind a link
    path_c.symlink_to(real_c)  # inside the tree: fine (a link to another image's bytes is a 409 since R1)
    env, tmp = tmpdir_env
    with start_server(own_index / "index", tmp_path / "srv", env=env) as srv, srv.client() as c:
        for image_id in (a, b):
            for url in (f"/api/images/{image_id}", f"/api/images/{image_id}/thumb"):
                resp = c.get(url)
                assert resp.status_code == 404 and "error" in resp.json(), (url, resp.text[:200])
            resp = c.post("/api/export", json={"ids": [image_id]})
            assert resp.status_code == 404 and "error" in resp.json()
            assert b"CLIP_HPC_TOKEN" not in resp.content and srv.token.encode() not in resp.content
        assert c.get(f"/api/images/{inside}").status_code == 200
        assert not list(tmp.glob("clip-hpc-export-*")), "no export ZIP may be left behind"


def test_unreadable_image_is_a_json_404_before_any_header(own_index, tmp_path, tmpdir_env):  # B5
    paths = indexed(own_index)
    image_id, path = list(paths.items())[7]
    path.chmod(0)
    env, tmp = tmpdir_env
    try:
        with (
            start_server(own_index / "index", tmp_path / "srv", env=env, preexec=drop_all_capabilities) as srv,
            srv.client() as c,
        ):
            resp = c.get(f"/api/images/{image_id}")
            assert resp.status_code == 404 and "cannot be read" in resp.json()["error"], resp.text[:200]
            resp = c.post("/api/export", json={"ids": [image_id, list(paths)[8]]})
            assert resp.status_code == 404 and "error" in resp.json(), resp.text[:200]
            assert not list(tmp.glob("clip-hpc-export-*")), "no /tmp/clip-hpc-export-*.zip may be left behind"
            assert c.get("/health").status_code == 200
    finally:
        path.chmod(0o644)


def test_head_export_dedupe_cookie_thumbnail_identity_weight_overflow_and_two_uploads(own_index, tmp_path):  # D2-4
    paths = indexed(own_index)
    image_id, path = list(paths.items())[9]
    with start_server(own_index / "index", tmp_path / "srv") as srv, srv.client() as c:
        assert c.head("/").status_code == 200
        head = c.head(f"/api/images/{image_id}")
        assert head.status_code == 200 and int(head.headers["content-length"]) == path.stat().st_size
        # two parts named `file`: the last one was searched without a word
        two = c.post(
            "/api/search/image",
            files=[("file", ("a.png", _small_png(), "image/png")), ("file", ("b.png", _small_png(), "image/png"))],
        )
        assert two.status_code == 400 and "one image" in two.json()["error"]
        # D3: one copy per id
        resp = c.post("/api/export", json={"ids": [image_id] * 1000})
        assert resp.status_code == 200
        import zipfile

        names = zipfile.ZipFile(io.BytesIO(resp.content)).namelist()
        assert len([n for n in names if n.startswith("images/")]) == 1
        # D2: the cookie is not the token, and works as a cookie only
        with srv.client(auth=False) as browser:
            first = browser.get("/api/info", params={"token": srv.token})
            cookie = first.headers["set-cookie"]
            assert srv.token not in cookie
            assert browser.get("/api/info").status_code == 200  # the jar's cookie lets the browser in
            value = cookie.split(";")[0].split("=", 1)[1]
        with srv.client(auth=False) as other:
            assert other.get("/api/info", headers={"Authorization": f"Bearer {value}"}).status_code == 401
        # D4: a replaced file is never served stale, nor as the indexed image (R1: 409 naming it); a deleted one a 404
        assert c.get(f"/api/images/{image_id}/thumb", params={"size": 64}).status_code == 200
        Image.new("RGB", (300, 300), (255, 0, 0)).save(path, format=Image.open(path).format or "PNG")
        for route in (f"/api/images/{image_id}/thumb", f"/api/images/{image_id}"):
            after = c.get(route, params={"size": 64} if route.endswith("thumb") else {})
            assert after.status_code == 409 and f"image {image_id}" in after.json()["error"], after.text[:200]
        path.unlink()
        assert c.get(f"/api/images/{image_id}/thumb", params={"size": 64}).status_code == 404
        # minor: a weight of 1e308 is an overflow, not "the parts cancel out"
        resp = c.post("/api/search", json={"text": "a cat", "weights": {"text": 1e308}})
        assert resp.status_code == 400 and "overflow" in resp.json()["error"], resp.text


def test_k_returns_min_k_n_results_when_ivf_lists_run_dry(tmp_path):  # D6
    emb, _ = synthetic_emb_dir(tmp_path / "emb", 2000, dim=32, clusters=40)
    run_cli(
        "index", emb, "--out", tmp_path / "index", "--index-key", "IVF32,Flat", "--nprobe", "1", "--quiet", check=True
    )
    engine = SearchEngine(tmp_path / "index", model_name="clip-hpc-tiny", pretrained="none")
    query = engine.vectors_for_ids([5])
    assert len(engine.search_vectors(query, 1000)[0]) == 1000
    assert len(engine.search_vectors(query, 5000)[0]) == 2000


@contextlib.contextmanager
def idle_connections(port: int, n: int):
    """`n` connections that send the start of a request line and then nothing (slow-loris)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET / HTTP/1.1\r\n")
            except OSError:
                pass
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def lower_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_idle_connections_cannot_lock_out_a_query_under_a_low_fd_limit(own_index, tmp_path):  # B3
    with start_server(own_index / "index", tmp_path / "srv", preexec=lower_fd_limit) as srv:
        with idle_connections(srv.port, 300), srv.client() as c:
            c.timeout = 20
            resp = c.get("/api/search", params={"q": "a photo", "k": 3})
            assert resp.status_code == 200 and len(resp.json()["results"]) == 3
            with idle_connections(srv.port, 300):
                assert c.get("/api/search", params={"q": "a dog", "k": 3}).status_code == 200
        log = srv.log.read_text()
    assert "Too many open files" not in log and len(log) < 20_000, log[-2000:]


def test_huge_png_uploads_stay_bounded_in_memory(own_index, tmp_path):  # B4
    buf = io.BytesIO()
    Image.new("RGB", (9400, 9400)).save(buf, "PNG")
    png = buf.getvalue()
    with start_server(own_index / "index", tmp_path / "srv") as srv:
        with srv.client() as c:
            c.post("/api/search/image", files={"file": ("warm.png", _small_png(), "image/png")})
        before = rss_bytes(srv.proc.pid)
        codes = []

        def upload() -> None:
            with srv.client() as c:
                codes.append(c.post("/api/search/image", files={"file": ("big.png", png, "image/png")}).status_code)

        threads = [threading.Thread(target=upload) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak, after = rss_bytes(srv.proc.pid, "VmHWM"), rss_bytes(srv.proc.pid)
    report = json.dumps({"before_mb": before >> 20, "peak_mb": peak >> 20, "after_mb": after >> 20})
    assert codes == [200] * 4, codes
    assert peak - before < 900 * 2**20, report  # two decodes at a time, at ~265 MB of RGB each
    assert after - before < 150 * 2**20, report  # and the memory goes back


def _small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()
