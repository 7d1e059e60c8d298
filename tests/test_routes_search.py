"""The search router in process: each route's results are what the engine itself finds, and bad input is a 4xx
JSON error, never a crash."""

from __future__ import annotations

import base64
import io

from PIL import Image

from clip_hpc.search.records import MAX_K


def ids_of(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def png_bytes(colour: str = "red", size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, "PNG")
    return out.getvalue()


def test_get_search_finds_what_the_engine_finds(routes_app):
    engine = routes_app.served.engine
    expected = [hit.id for hit in engine.search_text("a red square", k=7)]
    response = routes_app.client.get("/api/search", params={"q": "a red square", "k": 7})
    assert ids_of(response) == expected
    body = response.json()
    assert body["took_ms"] >= 0 and "query_vector" not in body
    first = body["results"][0]
    assert first["url"] == f"/api/images/{first['id']}" and first["path"] == engine.path_of(first["id"])


def test_get_search_with_a_filter_takes_the_unbatched_path_and_still_matches(routes_app):
    engine = routes_app.served.engine
    expected = [hit.id for hit in engine.search_combined(engine.query_vector(text="blue"), 5, diversity=0.5)]
    assert ids_of(routes_app.client.get("/api/search", params={"q": "blue", "k": 5, "diversity": 0.5})) == expected


def test_post_search_by_ids_matches_the_engine_and_returns_the_vector_when_asked(routes_app):
    engine = routes_app.served.engine
    expected = [hit.id for hit in engine.search_combined(engine.query_vector(positive_ids=[3, 4]), 6)]
    response = routes_app.client.post("/api/search", json={"positive_ids": [3, 4], "k": 6, "return_vector": True})
    assert ids_of(response) == expected
    assert len(response.json()["query_vector"]) == engine.encoder.dim


def test_image_upload_and_base64_search_match_the_engine(routes_app):
    engine, data = routes_app.served.engine, png_bytes("green")
    expected = [hit.id for hit in engine.search_image(data, k=5)]
    upload = routes_app.client.post("/api/search/image", params={"k": 5}, files={"file": ("g.png", data)})
    assert ids_of(upload) == expected
    b64 = routes_app.client.post("/api/search", json={"image_b64": base64.b64encode(data).decode(), "k": 5})
    assert ids_of(b64) == expected


def test_random_returns_k_distinct_indexed_ids_without_scores(routes_app):
    response = routes_app.client.get("/api/random", params={"k": 9})
    ids = ids_of(response)
    assert len(ids) == len(set(ids)) == 9 and all(routes_app.served.engine.contains(i) for i in ids)
    assert all(hit["score"] is None for hit in response.json()["results"])


def test_bad_search_input_is_a_json_4xx(routes_app):
    client = routes_app.client
    cases = [
        (client.get("/api/search", params={"q": "x", "k": MAX_K + 1}), 422, "invalid request: query.k"),
        (client.get("/api/search"), 422, "invalid request: query.q"),
        (client.post("/api/search", json={"positive_ids": [10**6]}), 404, "ids not in the index: [1000000]"),
        (client.post("/api/search", json={"image_b64": "not base64!"}), 400, "image_b64 is not valid base64"),
        (
            client.post("/api/search", content=b"{", headers={"content-type": "application/json"}),
            400,
            "malformed JSON body",
        ),
        (
            client.post("/api/search/image", files={"file": ("x.png", b"not an image")}),
            400,
            "cannot decode the image",
        ),
        (
            client.post(
                "/api/search/image", files=[("file", ("a.png", png_bytes())), ("file", ("b.png", png_bytes()))]
            ),
            400,
            "send one image in the form field 'file', not 2",
        ),
    ]
    for response, status, start in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"].startswith(start), response.json()


def test_an_upload_over_the_limit_is_413_and_search_needs_the_token(routes_app):
    big = routes_app.client.post("/api/search/image", files={"file": ("big.png", b"\0" * (2 * 2**20))})
    assert big.status_code == 413 and "error" in big.json()
    denied = routes_app.anonymous.get("/api/search", params={"q": "red"})
    assert denied.status_code == 401 and denied.json()["error"].startswith("token missing or wrong")
    denied_upload = routes_app.anonymous.post("/api/search/image", files={"file": ("big.png", b"\0" * (2 * 2**20))})
    assert denied_upload.status_code == 401  # auth runs before the upload limit
