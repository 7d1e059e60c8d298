"""The image router in process: an indexed id gives exactly its file's bytes (GET and HEAD) and a cached JPEG
thumbnail; an id the index does not hold is a JSON 404; nothing is served without the token."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from clip_hpc.server.schemas import MAX_THUMB


def test_an_indexed_image_is_its_file_and_head_says_so_without_a_body(routes_app):
    path = Path(routes_app.served.engine.path_of(5))
    got = routes_app.client.get("/api/images/5")
    assert got.status_code == 200 and got.content == path.read_bytes()
    assert got.headers["content-type"].startswith("image/")
    head = routes_app.client.head("/api/images/5")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(path.stat().st_size)


def test_a_thumbnail_is_a_small_cacheable_jpeg_and_the_second_comes_from_the_cache(routes_app):
    assert routes_app.served.engine.contains(7)
    first = routes_app.client.get("/api/images/7/thumb", params={"size": 32})
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert first.headers["cache-control"] == "private, max-age=3600"
    thumb = Image.open(io.BytesIO(first.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 32
    hits = routes_app.state.images.thumbnail_cache_hits()
    assert routes_app.client.get("/api/images/7/thumb", params={"size": 32}).content == first.content
    assert routes_app.state.images.thumbnail_cache_hits() == hits + 1


def test_unknown_or_malformed_ids_and_bad_sizes_are_json_errors(routes_app):
    client = routes_app.client
    cases = [
        (client.get("/api/images/1000000"), 404, "image 1000000 not found"),
        (client.get("/api/images/-1"), 404, "not found"),
        (client.get("/api/images/abc"), 404, "not found"),
        (client.get("/api/images/1000000/thumb"), 404, "image 1000000 not found"),
        (client.get("/api/images/1/thumb", params={"size": MAX_THUMB + 1}), 422, "invalid request: query.size"),
    ]
    for response, status, error in cases:
        assert response.status_code == status, response.text
        assert response.json() == {"error": error} or response.json()["error"].startswith(error)


def test_images_need_the_token(routes_app):
    for url in ("/api/images/5", "/api/images/5/thumb"):
        response = routes_app.anonymous.get(url)
        assert response.status_code == 401 and "token" in response.json()["error"]
