"""Red-team findings on serving (R5, R7, R9, R10 and the smaller ones seen beside them): nothing is served that was
not indexed, and every bad input is one line or a JSON 4xx."""

from __future__ import annotations

from pathlib import Path

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
    from clip_hpc.search.engine import check_recorded_model

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
    zipped = build_zip([(i + 1, source, None) for i, source in enumerate(sources)])
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
