"""Nothing is served that was not indexed: an input replaced after it was embedded (an object overwritten, a tar
member's bytes rewritten under the same header, a local file replaced) answers 409 naming the image on the image
route, the thumbnail and the ZIP export, never the new bytes. Real moto S3 server, real embed, index and serve."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clip_hpc.devdata.local_s3 import upload
from clip_hpc.formats.emb_dir import EmbDir
from conftest import run_cli
from s3_fixtures import BUCKET, S3Endpoint
from server_fixtures import start_server
from test_embed import TINY

pytest.importorskip("s3fs")


def png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, "PNG")
    return out.getvalue()


def jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, "JPEG", quality=90)
    return out.getvalue()


def one_member_tar(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_r1_a_replaced_object_member_or_file_is_refused_never_served(s3_endpoint: S3Endpoint, tmp_path: Path):
    member = jpeg((200, 30, 30))
    tar = one_member_tar("a.jpg", member)
    upload(s3_endpoint.direct, {f"{BUCKET}/l/x.png": png((10, 200, 10)), f"{BUCKET}/t/s.tar": tar})
    local = tmp_path / "loose" / "y.png"
    local.parent.mkdir()
    local.write_bytes(png((10, 10, 200)))
    env = s3_endpoint.env
    inputs = [f"s3://{BUCKET}/l/x.png", f"s3://{BUCKET}/t/s.tar", str(local)]
    run_cli("embed", *inputs, "--out", tmp_path / "emb", *TINY, "--workers", "0", env=env, check=True)
    run_cli("index", tmp_path / "emb", "--out", tmp_path / "index", "--quiet", env=env, check=True)
    lines = (tmp_path / "emb" / "inputs.txt").read_text().splitlines()
    ids = {line.rpartition("/")[2]: i for i, line in enumerate(lines)}
    assert set(ids) == {"x.png", "s.tar::a.jpg", "y.png"}, lines
    with start_server(tmp_path / "index", tmp_path / "serve", env=env) as served, served.client() as client:
        assert client.get(f"/api/images/{ids['s.tar::a.jpg']}").content == member  # served while unchanged
        assert client.get(f"/api/images/{ids['x.png']}").status_code == 200
        assert client.get(f"/api/images/{ids['y.png']}/thumb", params={"size": 32}).status_code == 200

        changed = bytearray(tar)
        changed[512 + 200 : 512 + 216] = bytes(16)  # 16 bytes of a.jpg's data; its header stays as it was
        upload(s3_endpoint.direct, {f"{BUCKET}/l/x.png": png((250, 250, 0)), f"{BUCKET}/t/s.tar": bytes(changed)})
        local.write_bytes(png((0, 0, 0), size=65))

        for name, image_id in ids.items():
            for route, params in ((f"/api/images/{image_id}", {}), (f"/api/images/{image_id}/thumb", {"size": 48})):
                got = client.get(route, params=params)
                assert got.status_code == 409, (name, route, got.status_code)
                assert f"image {image_id}" in got.json()["error"] and "changed" in got.json()["error"]
            export = client.post("/api/export", json={"ids": [image_id]})
            assert export.status_code == 409 and f"image {image_id}" in export.json()["error"], (name, export.text)


def test_r8_a_file_named_like_a_member_line_is_refused_not_read_as_the_member(tmp_path: Path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "t.tar").write_bytes(one_member_tar("evil.jpg", jpeg((255, 0, 0))))
    (folder / "t.tar::evil.jpg").write_bytes(jpeg((0, 0, 255)))
    run_cli("embed", folder, "--out", tmp_path / "emb", *TINY, "--workers", "0", check=True)
    lines = EmbDir(tmp_path / "emb").read_inputs()
    assert len(lines) == len(set(lines)) == 2, lines  # two inputs, two lines
    embedded, failed = [], {}
    for shard in EmbDir(tmp_path / "emb").iter_shards(with_embeddings=False):
        embedded += shard.paths
        failed.update(zip(shard.failed_paths, shard.failed_reasons))
    assert embedded == [f"{folder}/t.tar::evil.jpg"]  # the member, once
    assert len(failed) == 1 and "refused name" in next(iter(failed.values())), failed


def test_r8_objects_named_like_a_member_line_are_refused(s3_endpoint: S3Endpoint, monkeypatch):
    from clip_hpc.ingest.image_dataset import ImageDataset
    from clip_hpc.ingest.sources import list_inputs

    upload(
        s3_endpoint.direct,
        {f"{BUCKET}/w/t.tar": one_member_tar("m.jpg", jpeg((255, 0, 0))), f"{BUCKET}/w/t.tar::m.jpg": jpeg((0, 9, 9))},
    )
    for key, value in s3_endpoint.env.items():
        monkeypatch.setenv(key, value)
    listing = list_inputs([f"s3://{BUCKET}/w/"])
    assert len(listing.lines) == len(set(listing.lines)) == 2, listing.lines
    dataset = ImageDataset(range(2), listing.lines, lambda img: img, 1, 1 << 30, listing.tar_samples)
    reasons = [dataset[i][2] for i in range(2)]
    assert reasons[0] == "" and reasons[1].startswith("refused name"), reasons
