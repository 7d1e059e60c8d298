"""Red-team findings on serving (R5, R7, R9, R10 and the smaller ones seen beside them): nothing is served that was
not indexed, and every bad input is one line or a JSON 4xx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip_hpc.devdata import synthetic_vectors as synthetic
from clip_hpc.index.build import build_index
from conftest import run_cli


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> Path:
    """A Flat index whose index.json records clip-hpc-tiny (random weights), 128-d like clip-hpc-demo."""
    root = tmp_path_factory.mktemp("recorded")
    vectors, labels = synthetic.gaussian_mixture(300, 128, 5, latent=8, seed=1)
    synthetic.write_emb_dir(root / "emb", vectors, labels, 100, model="clip-hpc-tiny", pretrained="none")
    build_index(root / "emb", root / "index", progress=False)
    return root / "index"


@pytest.mark.parametrize("option", [("--model", "clip-hpc-demo"), ("--pretrained", "openai")])
def test_r5_serving_with_another_model_than_index_json_is_one_line(tiny_index, tmp_path, option):
    proc = run_cli("serve", tiny_index, *option, "--port", "0", "--connection-file", tmp_path / "c.json", timeout=90)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "built with clip-hpc-tiny" in lines[0] and "--other-model" in lines[0], lines
    assert not (tmp_path / "c.json").exists()


def test_r5_the_recorded_model_named_again_is_no_override(tiny_index):
    from clip_hpc.formats.index_dir import IndexDir
    from clip_hpc.server.serve import check_recorded_model

    check_recorded_model(IndexDir(tiny_index).load_info(), "clip-hpc-tiny", "none")  # no error


def test_r7_zip_entries_keep_only_the_last_name_part_and_metadata_names_the_member(tmp_path):
    import io
    import json
    import os
    import tarfile
    import zipfile

    from clip_hpc.ingest.tars import Member
    from clip_hpc.server.export import build_zip
    from clip_hpc.server.image_source import ImageSource

    tar = tmp_path / "evil.tar"
    names = ["..\\..\\..\\..\\tarevil.jpg", "...hidden.jpg", ".."]
    with tarfile.open(tar, "w") as tf:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"ab%d" % i))
    with tarfile.open(tar) as tf:
        members = {m.name: Member(m.offset_data, m.size) for m in tf.getmembers()}
    sources = [ImageSource(tar, os.path.basename(n), members[n], n) for n in names]
    zipped = build_zip([(i + 1, source, None) for i, source in enumerate(sources)], lambda _id, src: src.read_bytes())
    try:
        with zipfile.ZipFile(zipped) as zf:
            entries = zf.namelist()
            metadata = json.loads(zf.read("metadata.json"))
            assert [zf.read(e) for e in entries[:3]] == [b"ab0", b"ab1", b"ab2"]
    finally:
        os.unlink(zipped)
    assert entries == ["images/1_tarevil.jpg", "images/2_hidden.jpg", "images/3_image", "metadata.json"]
    assert [m["path"] for m in metadata] == [f"{tar}::{n}" for n in names]
    assert [m["file"] for m in metadata] == entries[:3]


@pytest.mark.parametrize("caption", ["true", "42", "4.5", "false", "0"])
def test_r9_a_json_caption_that_is_not_text_is_refused_like_a_list(caption):
    from clip_hpc.ingest.tars import decode_meta

    meta, notes = decode_meta(b'{"caption": ' + caption.encode() + b', "width": 3}')
    assert meta == {"width": 3}, meta
    assert any("caption" in note and "not text" in note for note in notes), notes
    assert decode_meta(b'{"caption": "a cat"}')[0] == {"caption": "a cat"}


@pytest.mark.parametrize(
    ("range_header", "status"), [("bytes=abc", 400), ("pages=0-1", 400), ("bytes=5-2", 400), ("bytes=99999999-", 416)]
)
def test_r10_a_bad_range_header_is_a_json_error(routes_app, range_header, status):
    got = routes_app.client.get("/api/images/5", headers={"Range": range_header})
    assert got.status_code == status and got.headers["content-type"] == "application/json", got.text
    assert got.json()["error"].startswith(("bad Range header", "Range not satisfiable"))
    good = routes_app.client.get("/api/images/5", headers={"Range": "bytes=0-9"})
    assert good.status_code == 206 and len(good.content) == 10


def test_r10_head_on_a_thumbnail_says_what_get_would(routes_app):
    head = routes_app.client.head("/api/images/7/thumb", params={"size": 32})
    assert head.status_code == 200 and head.headers["content-type"] == "image/jpeg" and head.content == b""
    assert routes_app.client.head("/api/images/1000000/thumb").status_code == 404


@pytest.mark.parametrize("scale", [1e38, 1e-40, 1e300, 1e-310])
def test_r10_a_huge_or_tiny_vector_is_searched_by_its_direction(routes_app, scale):
    engine = routes_app.served.engine
    row = np.asarray(engine.vectors[3], dtype=np.float64)
    got = routes_app.client.post("/api/search", json={"vector": (row * scale).tolist(), "k": 1})
    assert got.status_code == 200, got.text
    assert got.json()["results"][0]["id"] == 3
    zero = routes_app.client.post("/api/search", json={"vector": [0.0] * len(row), "k": 1})
    assert zero.status_code == 400 and "all zeros" in zero.json()["error"]


@pytest.mark.parametrize("body", [{"filters": {"min_similarity": True}}, {"min_score": False}, {"image_id": True}])
def test_seen_a_boolean_where_a_number_belongs_is_refused(routes_app, body):
    got = routes_app.client.post("/api/search", json={"text": "a red square", **body})
    assert got.status_code == 422 and "not true or false" in got.json()["error"], got.text


@pytest.mark.parametrize("field", ["k", "diversity"])
@pytest.mark.parametrize("value", [True, False])
def test_leftover_a_boolean_k_or_diversity_is_a_422_naming_the_field(routes_app, field, value):
    """`k: true` was read as k=1 (and `diversity: true` as 1.0): one result, without a word."""
    got = routes_app.client.post("/api/search", json={"text": "a red square", field: value})
    assert got.status_code == 422, got.text
    assert field in got.json()["error"] and "not true or false" in got.json()["error"], got.text
    export = routes_app.client.post("/api/export", json={"ids": [0], "scores": [value]})
    assert export.status_code == 422 and "scores" in export.json()["error"], export.text


@pytest.mark.parametrize("value", ["-inf", "nan", "-1e400"])
def test_seen_min_similarity_minus_inf_is_one_clear_line(value):
    proc = run_cli("search", "/nonexistent-index", "cat", "--min-similarity", value)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"clip-hpc search: error: argument --min-similarity: must be a finite number, not {value}"
    )


def test_seen_a_resume_after_an_input_was_deleted_names_it_and_what_to_do():
    from clip_hpc.errors import UserError
    from clip_hpc.ingest.sources import reconcile_inputs

    with pytest.raises(UserError) as raised:
        reconcile_inputs(["s3://b/a.jpg", "s3://b/gone.jpg"], ["s3://b/a.jpg"], append=False)
    message = str(raised.value)
    assert "s3://b/gone.jpg" in message and "no longer there" in message and "new files" not in message
    assert reconcile_inputs(["a", "gone"], ["a"], append=True) == ["a", "gone"]  # --append goes on, as it says
