"""Serving an index built from WebDataset tars through a real `clip-hpc serve`: hits carry the member's caption,
/api/images/{id} and the ZIP export return the member's exact bytes, a caption filter narrows the results.
About 15 s (embed + index of 40 images, one server start)."""

import io
import mimetypes
import tarfile
import zipfile

import pytest

from clip_hpc.formats.index_dir import IndexDir
from conftest import make_images, run_cli
from server_fixtures import start_server
from tar_fixtures import caption_of, write_wds_tars

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def tar_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tar-serve")
    write_wds_tars(make_images(root / "images", 40, seed=5), root / "tars", per_tar=16)
    run_cli(
        "embed",
        root / "tars",
        "--out",
        root / "emb",
        "--model",
        "clip-hpc-tiny",
        "--pretrained",
        "none",
        "--shard-size",
        "20",
        "--workers",
        "0",
        check=True,
    )
    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    with start_server(root / "index", root / "serve") as served:
        yield served


def member_bytes(line: str) -> bytes:
    tar, member = line.split("::")
    with tarfile.open(tar) as tf:
        return tf.extractfile(member).read()


def test_hits_carry_captions_and_images_are_the_members_bytes(tar_server):
    with tar_server.client() as client:
        hits = client.get("/api/search", params={"q": "a boat", "k": 40}).json()["results"]
        assert len(hits) == 40
        for hit in hits:
            assert hit["caption"] == caption_of(hit["id"]) and "::" in hit["path"]
        for hit in hits[:5]:
            got = client.get(hit["url"])
            assert got.status_code == 200 and got.content == member_bytes(hit["path"])
            assert got.headers["content-type"] == mimetypes.guess_type(hit["path"].split("::")[1])[0]
            thumb = client.get(hit["thumb"], params={"size": 64})
            assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        ids = [h["id"] for h in hits[:3]]
        archive = client.post("/api/export", json={"ids": ids})
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zf:
            for hit in hits[:3]:
                name = f"images/{hit['id']}_{hit['path'].split('::')[1]}"
                assert zf.read(name) == member_bytes(hit["path"])
        random = client.get("/api/random", params={"k": 5}).json()["results"]
        assert all(h["caption"] == caption_of(h["id"]) for h in random)


def test_caption_filter_narrows_results(tar_server):
    with IndexDir(tar_server.index_dir).open_metadata() as meta:
        want = {i for i in meta.all_ids() if "red" in caption_of(i).split()}
    assert 0 < len(want) < 40
    with tar_server.client() as client:
        got = client.get("/api/search", params={"q": "anything", "k": 40, "caption": "red"}).json()["results"]
        assert {h["id"] for h in got} == want
        both = client.post("/api/search", json={"text": "x", "k": 40, "filters": {"caption": "red barn"}}).json()
        assert {h["id"] for h in both["results"]} == {i for i in want if "barn" in caption_of(i)}
        none = client.get("/api/search", params={"q": "x", "caption": "zeppelin"}).json()["results"]
        assert none == []
        bad = client.post("/api/search", json={"text": "x", "filters": {"caption": "!!!"}})
        assert bad.status_code == 400 and "no words" in bad.json()["error"]


def test_n13_tar_under_a_directory_with_double_colon(tmp_path):
    """N13: `d::x/00000.tar::KEY.jpg` is split at the `::` after the tar, not the first one, so every member (one
    whose own name holds `::` too) comes back byte for byte, and the served root stays `d::x`, not its parent."""
    import os

    from clip_hpc.devdata.sample_images import captioned_samples, write_tar
    from clip_hpc.server.files import embedded_root

    samples = captioned_samples(6)
    samples[2] = ("odd::name", samples[2][1])
    tar = write_tar(tmp_path / "d::x" / "00000.tar", samples)
    want = {f"{tar}::{key}.jpg": members["jpg"] for key, members in samples}
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
    with IndexDir(tmp_path / "index").open_metadata() as meta:
        assert embedded_root(meta.path_bounds()) == os.path.realpath(tar.parent)
    with start_server(tmp_path / "index", tmp_path / "serve") as served, served.client() as client:
        hits = client.get("/api/random", params={"k": 10}).json()["results"]
        assert sorted(h["path"] for h in hits) == sorted(want)
        for hit in hits:
            got = client.get(hit["url"])
            assert got.status_code == 200, got.text
            assert got.content == want[hit["path"]]
