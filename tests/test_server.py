"""The HTTP API against a real `clip-hpc serve` process (uvicorn on 127.0.0.1, the real index and tiny model):
auth on every route, every route's behaviour, the error statuses, the unix socket, and schemathesis for 5xx."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import stat
import zipfile

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode

from clip_hpc.formats.metadata import MetadataStore
from server_fixtures import TOKEN, start_server

VALID_ID = 0
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _sample_png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


# (method, path, request kwargs) for every route but /health; each must answer 200 with the token
ROUTES = [
    ("GET", "/", {}),
    ("GET", "/static/app.js", {}),
    ("GET", "/docs", {}),
    ("GET", "/openapi.json", {}),
    ("GET", "/metrics", {}),
    ("GET", "/api/info", {}),
    ("GET", "/api/search?q=red+circle&k=3", {}),
    ("POST", "/api/search", {"json": {"text": "red circle", "k": 3}}),
    ("POST", "/api/search/image?k=3", {"files": {"file": ("x.png", _sample_png_bytes(), "image/png")}}),
    ("GET", "/api/random?k=3", {}),
    ("GET", f"/api/images/{VALID_ID}", {}),
    ("GET", f"/api/images/{VALID_ID}/thumb", {}),
    ("POST", "/api/export", {"json": {"ids": [VALID_ID]}}),
]
ROUTE_IDS = [f"{m} {p.split('?')[0]}" for m, p, _ in ROUTES]


def _with_query_token(path: str, token: str) -> str:
    return path + ("&" if "?" in path else "?") + f"token={token}"


@pytest.fixture(scope="module")
def meta(live_server):
    """id -> path of the served index, read straight from meta.sqlite."""
    with MetadataStore(live_server.index_dir / "meta.sqlite", readonly=True) as store:
        return store.paths_of(store.all_ids())


@pytest.fixture(scope="module")
def vectors(live_server):
    return np.load(live_server.index_dir / "vectors.npy").astype(np.float32)


# --- auth --------------------------------------------------------------------------------------------------------
def test_health_is_open_and_reveals_nothing(live_server):
    with live_server.client(auth=False) as c:
        r = c.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize("method,path,kw", ROUTES, ids=ROUTE_IDS)
def test_auth_matrix(live_server, method, path, kw):
    with live_server.client(auth=False) as c:
        none = c.request(method, path, **kw)
        wrong = c.request(method, path, headers={"Authorization": "Bearer not-the-token"}, **kw)
        wrong_query = c.request(method, _with_query_token(path, "nope"), **kw)
        header = c.request(method, path, headers=AUTH, **kw)
    for denied in (none, wrong, wrong_query):
        assert denied.status_code == 401 and "token" in denied.json()["error"]
    assert header.status_code == 200, header.text
    assert "set-cookie" not in header.headers

    with live_server.client(auth=False) as c:
        query = c.request(method, _with_query_token(path, TOKEN), **kw)
        assert query.status_code == 200, query.text
        cookie = query.headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        by_cookie = c.request(method, path, **kw)  # the jar now holds the cookie the query set
    assert by_cookie.status_code == 200, by_cookie.text


# --- searches ----------------------------------------------------------------------------------------------------
def _ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def test_text_search_returns_k_ranked_results(live_server, meta):
    with live_server.client() as c:
        body = c.get("/api/search", params={"q": "a red circle", "k": 7}).json()
    hits = body["results"]
    assert len(hits) == 7 and body["took_ms"] >= 0
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for h in hits:
        assert h["path"] == meta[h["id"]] and h["url"] == f"/api/images/{h['id']}"


def test_image_id_and_raw_vector_find_themselves(live_server, vectors):
    with live_server.client() as c:
        assert _ids(c.post("/api/search", json={"image_id": 11, "k": 3}))[0] == 11
        assert _ids(c.post("/api/search", json={"vector": vectors[23].tolist(), "k": 3}))[0] == 23
        short = c.post("/api/search", json={"vector": [0.1, 0.2], "k": 3})
    assert short.status_code == 400 and "length" in short.json()["error"]


def _png_id(meta) -> int:
    return next(i for i, p in sorted(meta.items()) if p.lower().endswith(".png"))


def test_uploaded_image_finds_its_indexed_copy(live_server, meta):
    image_id = _png_id(meta)
    data = open(meta[image_id], "rb").read()
    with live_server.client() as c:
        upload = c.post("/api/search/image", params={"k": 3}, files={"file": ("q.png", data, "image/png")})
        b64 = c.post("/api/search", json={"image_b64": base64.b64encode(data).decode(), "k": 3})
    assert _ids(upload)[0] == image_id and _ids(b64)[0] == image_id
    assert upload.json()["results"][0]["score"] > 0.99


def test_weights_decide_which_part_counts(live_server):
    with live_server.client() as c:
        text_only = _ids(c.post("/api/search", json={"text": "blue square", "k": 10}))
        muted_image = _ids(
            c.post("/api/search", json={"text": "blue square", "image_id": 5, "k": 10, "weights": {"image": 0.0}})
        )
        muted_text = _ids(
            c.post(
                "/api/search",
                json={"text": "blue square", "image_id": 5, "k": 10, "weights": {"text": 0.0, "image": 1.0}},
            )
        )
    assert muted_image == text_only
    assert muted_text[0] == 5


def test_negative_examples_push_results_down(live_server):
    with live_server.client() as c:
        pos = _ids(c.post("/api/search", json={"positive_ids": [3, 4], "k": 60}))
        neg = _ids(
            c.post(
                "/api/search",
                json={
                    "positive_ids": [3, 4],
                    "negative_ids": [4],
                    "k": 60,
                    "weights": {"positive": 1.0, "negative": 1.0},
                },
            )
        )
    assert pos.index(4) < neg.index(4)


def test_min_score_cuts_the_tail(live_server):
    with live_server.client() as c:
        full = c.get("/api/search", params={"q": "green stripes", "k": 20}).json()["results"]
        threshold = full[4]["score"]
        cut = c.get("/api/search", params={"q": "green stripes", "k": 20, "min_score": threshold}).json()["results"]
    assert 5 <= len(cut) < len(full)
    assert all(h["score"] >= threshold for h in cut)


def test_diversity_spreads_the_results(live_server, vectors):
    def mean_similarity(ids: list[int]) -> float:
        v = vectors[ids]
        sim = v @ v.T
        return float((sim.sum() - np.trace(sim)) / (len(ids) * (len(ids) - 1)))

    with live_server.client() as c:
        plain = _ids(c.post("/api/search", json={"image_id": 8, "k": 8}))
        diverse = _ids(c.post("/api/search", json={"image_id": 8, "k": 8, "diversity": 0.9}))
    assert len(set(diverse)) == 8 and diverse != plain
    assert mean_similarity(diverse) < mean_similarity(plain)


def test_path_prefix_filter(live_server, meta):
    prefix = os.path.dirname(meta[VALID_ID]) + os.sep
    inside = sum(p.startswith(prefix) for p in meta.values())
    with live_server.client() as c:
        hits = c.post("/api/search", json={"text": "photo", "k": 60, "filters": {"path_prefix": prefix}}).json()
    assert len(hits["results"]) == inside < len(meta)
    assert all(h["path"].startswith(prefix) for h in hits["results"])


def test_random_gives_distinct_indexed_ids(live_server, meta):
    with live_server.client() as c:
        ids = _ids(c.get("/api/random", params={"k": 12}))
    assert len(set(ids)) == 12 and set(ids) <= set(meta)


# --- images and export -------------------------------------------------------------------------------------------
def test_image_and_thumbnail_are_the_indexed_file(live_server, meta):
    with live_server.client() as c:
        full = c.get(f"/api/images/{VALID_ID}")
        thumb = c.get(f"/api/images/{VALID_ID}/thumb", params={"size": 64})
        too_big = c.get(f"/api/images/{VALID_ID}/thumb", params={"size": 100000})
    assert full.content == open(meta[VALID_ID], "rb").read()
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
    assert too_big.status_code == 422 and "size" in too_big.json()["error"]


def _raw_get(port: int, raw_path: str) -> tuple[int, bytes]:
    """Send the path byte for byte: HTTP clients normalise '..' away before it reaches the server."""
    return _raw_request(
        port,
        f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode(),
    )


def _raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


TRAVERSALS = [
    "/api/images/999999",
    "/api/images/-1",
    "/api/images/9223372036854775808",
    "/api/images/1e3",
    "/api/images/0x1",
    "/api/images/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/images/%2Fetc%2Fpasswd",
    "/api/images/0/..%2F..%2Fetc%2Fpasswd",
    "/api/images/999999/thumb",
    "/static/../server.py",
    "/static/..%2Fserver.py",
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/server.py",
    "/api/images/../../../etc/passwd",
    "/etc/passwd",
]


@pytest.mark.parametrize("raw_path", TRAVERSALS)
def test_traversal_and_unknown_ids_are_404(live_server, raw_path):
    status, data = _raw_get(live_server.port, raw_path)
    assert status == 404, data[:300]
    assert b"root:" not in data and b"import " not in data


def test_search_and_export_with_unknown_ids_are_404(live_server):
    with live_server.client() as c:
        for r in (
            c.post("/api/search", json={"image_id": 999999}),
            c.post("/api/export", json={"ids": [0, 999999]}),
            c.post("/api/search", json={"positive_ids": [999999]}),
        ):
            assert r.status_code == 404 and "999999" in r.json()["error"]


def test_export_zip_holds_images_and_metadata(live_server, meta):
    ids, scores = [0, 5, 9], [0.5, 0.25, None]
    with live_server.client() as c:
        r = c.post("/api/export", json={"ids": ids, "scores": scores})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        metadata = json.loads(zf.read("metadata.json"))
        assert [(m["id"], m["path"], m["score"]) for m in metadata] == list(zip(ids, (meta[i] for i in ids), scores))
        for m in metadata:
            assert m["file"].startswith("images/") and zf.read(m["file"]) == open(meta[m["id"]], "rb").read()


# --- errors ------------------------------------------------------------------------------------------------------
def test_oversize_upload_is_413(live_server):
    big = os.urandom(int(1.5 * 2**20))  # the fixture's limit is 1 MiB
    with live_server.client() as c:
        upload = c.post("/api/search/image", files={"file": ("big.png", big, "image/png")})
        b64 = c.post("/api/search", json={"image_b64": base64.b64encode(big).decode()})
        chunked = c.post(
            "/api/search", content=iter([b"{" + b" " * 2**19] * 3), headers={"content-type": "application/json"}
        )
    for r in (upload, b64, chunked):
        assert r.status_code == 413 and "too large" in r.json()["error"]


def test_garbage_image_is_400(live_server):
    with live_server.client() as c:
        upload = c.post("/api/search/image", files={"file": ("x.jpg", b"\xff\xd8not really a jpeg", "image/jpeg")})
        b64 = c.post("/api/search", json={"image_b64": base64.b64encode(b"GIF89a garbage").decode()})
        not_b64 = c.post("/api/search", json={"image_b64": "%%% not base64 %%%"})
    for r in (upload, b64, not_b64):
        assert r.status_code == 400 and r.json()["error"]


def test_malformed_requests_get_a_message(live_server):
    with live_server.client() as c:
        bad_json = c.post("/api/search", content=b'{"text": "red",', headers={"content-type": "application/json"})
        wrong_type = c.post("/api/search", json={"text": "red", "k": "many"})
        unknown_field = c.post("/api/search", json={"txet": "red"})
        empty = c.post("/api/search", json={"k": 3})
        bad_weight = c.post("/api/search", json={"text": "red", "weights": {"colour": 1}})
        no_query = c.get("/api/search")
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]
    for r in (wrong_type, unknown_field, bad_weight, no_query):
        assert r.status_code == 422 and r.json()["error"].startswith("invalid request")
    assert empty.status_code == 400 and "empty query" in empty.json()["error"]


def test_a_request_the_http_parser_rejects_gets_a_json_400(live_server):
    """It never reaches the app (uvicorn answers it), yet its error is JSON like every other (the schema fuzzer
    found uvicorn's plain-text 'Invalid HTTP request received.')."""
    for request in (
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon in this header\r\n\r\n",
        b"GET /api/search?q=a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        status, data = _raw_request(live_server.port, request)
        head, _, body = data.partition(b"\r\n\r\n")
        assert status == 400 and b"application/json" in head.lower(), data
        assert "not a valid HTTP/1.1 request" in json.loads(body)["error"]
    with live_server.client() as c:  # and the server goes on serving
        assert c.get("/health").status_code == 200


# --- metrics, cache, docs ----------------------------------------------------------------------------------------
def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_metrics_count_requests_and_text_cache_hits(live_server):
    with live_server.client() as c:
        before = c.get("/metrics").text
        for _ in range(3):
            assert c.get("/api/search", params={"q": "a cached query about zebras", "k": 2}).status_code == 200
        after = c.get("/metrics").text
    key = 'clip_hpc_requests_total{route="/api/search",method="GET",status="200"}'
    assert _metric(after, key) - _metric(before, key) == 3
    hits = 'clip_hpc_text_cache_total{result="hit"}'
    misses = 'clip_hpc_text_cache_total{result="miss"}'
    assert _metric(after, hits) - _metric(before, hits) == 2
    assert _metric(after, misses) - _metric(before, misses) == 1
    assert "clip_hpc_index_vectors 60" in after


def test_docs_and_schema(live_server):
    with live_server.client() as c:
        docs = c.get("/docs")
        schema = c.get("/openapi.json").json()
    assert "swagger" in docs.text.lower()
    assert {"/api/search", "/api/search/image", "/api/export", "/api/random"} <= set(schema["paths"])


# --- unix socket and the announcement ----------------------------------------------------------------------------
def test_unix_socket_is_private_and_cleaned_up(served_index, tmp_path):
    sock_path = tmp_path / "s" / "clip.sock"
    with start_server(
        served_index, tmp_path, "--uds", str(sock_path), env={"CLIP_HPC_LOGIN_HOST": "me@login.example"}
    ) as srv:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(srv.connection_file).st_mode) == 0o600
        info = json.loads(srv.connection_file.read_text())
        assert info["uds"] == str(sock_path) and info["token"] == TOKEN and info["pid"] == srv.proc.pid
        with srv.client() as c:
            assert _ids(c.get("/api/search", params={"q": "red", "k": 2}))
        with srv.client(auth=False) as c:
            assert c.get("/api/info").status_code == 401
        log = srv.log.read_text()
        assert f"ssh -N -L {info['local_port']}:{sock_path} -J me@login.example" in log
        assert f"http://localhost:{info['local_port']}/?token={TOKEN}" in log
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(timeout=20) == 0
    assert not sock_path.exists() and not srv.connection_file.exists()


# --- schemathesis: no input makes the server fail ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_input_gives_a_5xx(live_server, mode):
    """Cases generated from the app's own OpenAPI schema, valid and invalid, sent to the live server with the token."""
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json", headers=AUTH)
    seen: list[int] = []

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=schema.as_strategy(mode))
    def check(case):
        response = case.call(headers=AUTH, timeout=60)
        seen.append(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"
        if response.status_code >= 400:
            assert "error" in response.json()

    check()
    assert len(seen) >= 50
    if mode == GenerationMode.POSITIVE:
        assert 200 in seen


# --- the shared encoder (in-process: its concurrency logic, with a slow stand-in for the model) -----------------
def test_concurrent_misses_for_one_text_encode_it_once():
    import threading
    import time

    from clip_hpc.server.runtime import ServingRuntime
    from clip_hpc.server.shared_encoder import SharedEncoder

    calls: list[list[str]] = []

    class SlowEncoder:
        dim = 4

        def encode_text(self, texts):
            calls.append(list(texts))
            time.sleep(0.3)  # long enough for every other thread to queue up behind the model lock
            return np.ones((len(texts), 4), np.float32)

        def encode_images(self, images):
            raise AssertionError("not used")

    encoder = SharedEncoder(SlowEncoder(), ServingRuntime.start(), cache_size=2)
    threads = [threading.Thread(target=encoder.encode_text, args=(["same text"],)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [["same text"]]
    encoder.encode_text(["b", "c", "same text"])  # the cache holds 2: "same text" is evicted...
    encoder.encode_text(["same text"])  # ...and computed again
    assert calls[1:] == [["b", "c"], ["same text"]]
