"""The export router in process: the chosen images, each once with its first score, and metadata.json in one ZIP;
bad requests are JSON 4xx errors; the token is required."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path


def test_export_zips_each_chosen_image_once_with_its_first_score(routes_app):
    engine = routes_app.served.engine
    response = routes_app.client.post("/api/export", json={"ids": [2, 1, 2], "scores": [0.5, 0.25, 0.125]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert 'filename="clip-hpc-export.zip"' in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        metadata = json.loads(zf.read("metadata.json"))
        assert [(m["id"], m["score"]) for m in metadata] == [(2, 0.5), (1, 0.25)]
        for entry in metadata:
            assert zf.read(entry["file"]) == Path(engine.path_of(entry["id"])).read_bytes()


def test_bad_exports_are_json_errors_and_need_the_token(routes_app):
    client = routes_app.client
    cases = [
        (client.post("/api/export", json={"ids": [1, 10**6]}), 404, "ids not in the index: [1000000]"),
        (client.post("/api/export", json={"ids": [1, 2], "scores": [0.5]}), 400, "scores has 1 entries but ids has 2"),
        (client.post("/api/export", json={"ids": []}), 422, "invalid request: body.ids"),
    ]
    for response, status, error in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"].startswith(error), response.json()
    assert routes_app.anonymous.post("/api/export", json={"ids": [1]}).status_code == 401
