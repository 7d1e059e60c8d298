"""The Python API on a local INDEX_DIR (`clip_hpc.open_index`): each query gives the ids and scores that `clip-hpc
search` and the served POST /api/search give for it, and the results draw, export and decode as promised."""

from __future__ import annotations

import io
import json
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

import clip_hpc
from api_fixtures import assert_same
from clip_hpc.ann.core import DEFAULT_WEIGHTS
from clip_hpc.api.query import NEGATIVE_WEIGHT
from clip_hpc.api.results import Hit, Results
from clip_hpc.cli import main as cli_main
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir


@pytest.fixture(scope="module")
def index(demo_index):
    with clip_hpc.open_index(demo_index, device="cpu") as opened:
        yield opened


def cli_search(capsys, *args) -> list[dict]:
    """`clip-hpc search ... --json`, its entry run in this process (a subprocess would spend its time importing)."""
    capsys.readouterr()
    assert cli_main(["search", *map(str, args), "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)["results"]


def test_text_search_matches_the_cli(index, demo_index, capsys):
    results = index.search("a red circle", k=8)
    assert isinstance(results, Results) and len(results) == 8 and all(isinstance(h, Hit) for h in results)
    assert_same(results, cli_search(capsys, demo_index, "a red circle", "-k", "8"))
    assert all("::" in h.path and h.caption for h in results)  # tar members, with their captions


def test_image_and_combined_search_match_the_cli(index, demo_index, tmp_path, capsys):
    query = tmp_path / "query.jpg"
    query.write_bytes(index.image_bytes(3))
    assert index.search(image=query, k=1)[0].id == 3  # the image finds itself
    both = index.search("a blue star", image=query, k=6)
    assert_same(both, cli_search(capsys, demo_index, "a blue star", "--image", query, "-k", "6"))
    # the same image as bytes and as a PIL image is the same query
    assert_same(index.search(image=query.read_bytes(), k=6), index.search(image=query, k=6))
    assert_same(index.search(image=Image.open(query), k=6), index.search(image=query, k=6))


BODIES = [
    {"text": "a green triangle", "k": 7},
    {"text": "a red square", "image_id": 5, "negative_ids": [5, 9], "weights": {"text": 2.0}, "k": 9},
    {"text": "a yellow circle", "filters": {"caption": "yellow"}, "k": 5},
    {"image_id": 11, "filters": {"path_prefix": "TARS/00001.tar"}, "k": 5, "min_score": 0.0},
    {"text": "a shape", "diversity": 0.7, "k": 6},
    {"vector": "IMAGE_4", "negative_ids": [4], "weights": {"negative": 0.1}, "k": 4},
]


def api_args(body: dict, index) -> dict:
    """POST /api/search's body as `search`'s keywords: `image_id` is `image=ID`, negatives are ids."""
    args = {key: value for key, value in body.items() if key not in ("image_id", "negative_ids")}
    if "image_id" in body:
        args["image"] = body["image_id"]
    if "negative_ids" in body:
        args["negatives"] = body["negative_ids"]
    return args


def concrete(body: dict, index, demo_index) -> dict:
    body = json.loads(json.dumps(body))
    if body.get("vector") == "IMAGE_4":
        body["vector"] = [float(x) for x in index.engine.vectors[4]]
    prefix = body.get("filters", {}).get("path_prefix")
    if prefix:
        body["filters"]["path_prefix"] = prefix.replace("TARS", str(demo_index.parent / "tars"))
    return body


@pytest.mark.parametrize("body", BODIES, ids=[",".join(sorted(b)) for b in BODIES])
def test_combined_queries_match_post_api_search(index, demo_index, demo_server, body):
    body = concrete(body, index, demo_index)
    with demo_server.client() as client:
        resp = client.post("/api/search", json=body)
    assert resp.status_code == 200, resp.text
    served = resp.json()["results"]
    found = index.search(**api_args(body, index))
    assert_same(found, served)
    if "filters" in body and "caption" in body["filters"]:
        assert all("yellow" in h.caption for h in found)


def test_negative_texts_are_subtracted_with_the_negative_weight(index):
    """A negative text subtracts its unit vector with the negative weight (0.25 unless given), as an id does."""
    assert NEGATIVE_WEIGHT == DEFAULT_WEIGHTS["negative"]  # the light copy the remote side uses
    texts = index.engine.encoder.encode_text(["a red circle", "a blue star"])
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    for weights, w in (({}, 0.25), ({"negative": 0.9}, 0.9)):
        expected = index.search(vector=texts[0] - w * texts[1], k=10)
        assert_same(index.search("a red circle", negatives=["a blue star"], weights=weights, k=10), expected)
    assert index.search("a red circle", negatives=["a blue star"], k=10).ids != index.search("a red circle", k=10).ids
    with pytest.raises(UserError, match="either a vector or negative texts"):
        index.search(vector=[0.0] * 4, negatives=["x"])


def test_results_table_and_grid(index):
    results = index.search("a blue star", k=5)
    frame = results.to_pandas()
    assert list(frame.columns) == ["id", "score", "path", "caption", "url"] and list(frame["id"]) == results.ids
    page = results._repr_html_()
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbs) == 5
    import base64

    sizes = [Image.open(io.BytesIO(base64.b64decode(t))).size for t in thumbs]
    assert all(max(s) <= 160 for s in sizes) and all(f"{h.score:.4f}" in page for h in results)
    hostile = Results([Hit(1, 0.5, "/x/<script>.png", 'a <script>alert("x")</script> cat')], index.thumbnail)
    drawn = hostile._repr_html_()
    assert "<script>" not in drawn and "&lt;script&gt;" in drawn


def test_image_and_export_match_the_server(index, demo_server, tmp_path):
    with Image.open(io.BytesIO(index.image_bytes(7))) as stored:
        assert index.image(7).size == stored.size and index.image(7).tobytes() == stored.convert(stored.mode).tobytes()
    results = index.search("a green circle", k=4)
    out = index.export(results, tmp_path / "picked.zip")
    assert out.exists() and not list(tmp_path.glob(".picked.zip.*"))  # no temporary left behind
    with demo_server.client() as client:
        resp = client.post("/api/export", json={"ids": results.ids, "scores": results.scores})
    assert resp.status_code == 200
    mine, theirs = zipfile.ZipFile(out), zipfile.ZipFile(io.BytesIO(resp.content))
    assert sorted(mine.namelist()) == sorted(theirs.namelist())
    assert json.loads(mine.read("metadata.json")) == json.loads(theirs.read("metadata.json"))
    for name in mine.namelist():
        assert mine.read(name) == theirs.read(name)


def test_bad_queries_are_one_line_errors(index):
    with pytest.raises(UserError, match="empty query"):
        index.search()
    assert (
        index.search(image=np.int64(3), negatives=[np.int64(4)], k=3).ids
        == index.search(image=3, negatives=[4], k=3).ids
    )
    with pytest.raises(UserError, match="unknown filters"):
        index.search("x", filters={"colour": "red"})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(UserError, match="unknown image id"):
        index.search(image=10_000)
    with pytest.raises(UserError, match="unknown image id"):
        index.image(10_000)
    with pytest.raises(UserError, match="k must be"):
        index.search("x", k=0)
    with pytest.raises(UserError, match="not a file"):
        index.search(image="/nonexistent.jpg")


def test_stages_are_the_cli_entries(demo_index, tmp_path):
    """`clip_hpc.embed` and `clip_hpc.build_index` on the demo tars write what `clip-hpc embed` and `clip-hpc index`
    wrote for the demo index (the fixture ran the CLI with the same settings)."""
    tars = demo_index.parent / "tars"
    summary = clip_hpc.embed([tars], tmp_path / "emb", model="clip-hpc-demo", workers=0, shard_size=24, progress=False)
    assert summary["complete"]
    info = clip_hpc.build_index(tmp_path / "emb", tmp_path / "index", progress=False)
    assert info.n == 48
    ours, theirs = EmbDir(tmp_path / "emb"), EmbDir(demo_index.parent / "emb")
    for mine, cli in zip(ours.iter_shards(), theirs.iter_shards(), strict=True):
        assert np.array_equal(mine.ids, cli.ids) and np.allclose(mine.embeddings, cli.embeddings, atol=1e-3)
    with clip_hpc.open_index(tmp_path / "index", device="cpu") as api, clip_hpc.open_index(demo_index) as cli_index:
        for i in (0, 5, 47):
            assert_same(api.search(image=i, k=5), cli_index.search(image=i, k=5))


def test_root_names_are_the_public_api():
    assert set(clip_hpc.__all__) >= {"open_index", "connect", "Index", "RemoteIndex", "Results", "Hit", "embed"}
    assert "build_index" in dir(clip_hpc)
    with pytest.raises(AttributeError):
        clip_hpc.no_such_name  # noqa: B018
