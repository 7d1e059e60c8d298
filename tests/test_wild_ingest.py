"""Issue 20, the ingest part: web-scale inputs (thin images, any caption bytes, any file or member name, sparse
and duplicate tar members, any exception in a worker) never crash a run and never cost unbounded memory."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.ingest import image_dataset as dataset_module
from clip_hpc.ingest import images
from clip_hpc.ingest.embed import EmbedConfig, embed
from clip_hpc.ingest.image_dataset import ImageDataset
from clip_hpc.ingest.images import decode_image
from clip_hpc.ingest.sources import list_inputs
from conftest import make_images, run_cli
from server_fixtures import start_server
from wild_data import jpeg_bytes, png_bytes, write_sparse_tar, write_tar

TINY = ("--model", "clip-hpc-tiny", "--pretrained", "none")


@pytest.fixture(scope="module")
def tiny():
    from clip_hpc.model.loading import load_model

    return load_model("clip-hpc-tiny", "none", "cpu", "fp32")


def run_embed(inputs: list, out: Path) -> dict:
    """In process, no workers: the dataset code runs here, so a failure is a traceback in the test."""
    return embed(
        EmbedConfig(
            inputs=[str(p) for p in inputs],
            out=str(out),
            model="clip-hpc-tiny",
            pretrained="none",
            workers=0,
            progress=False,
            shard_size=50,
        )
    )


def all_rows(out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """path -> meta of the embedded, path -> reason of the failed, over every shard."""
    done, failed = {}, {}
    for shard in EmbDir(out).iter_shards(with_embeddings=False):
        done.update(zip(shard.paths, shard.meta))
        failed.update(zip(shard.failed_paths, shard.failed_reasons))
    return done, failed


def test_n1_thin_images_cost_a_bounded_crop_with_the_models_own_pixels(tiny):
    size = tiny.image_size
    for w, h in ((30, 2000), (2000, 30), (7, 5000), (1, 3000)):  # the standard path still fits in memory here
        data = png_bytes(w, h)
        ours = decode_image(data, min_size=size)
        assert max(ours.size) <= size * images.MAX_ASPECT and min(ours.size) == size, (w, h, ours.size)
        standard = tiny.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
        assert float((tiny.preprocess(ours) - standard).abs().max()) <= 1e-3, (w, h)
    for w, h in ((1, 200_000), (200_000, 1)):  # 224 x 44.8M pixels the standard way
        ours = decode_image(png_bytes(w, h), min_size=size)
        assert ours.size[0] * ours.size[1] <= size * size * images.MAX_ASPECT
        assert tiny.preprocess(ours).shape == (3, size, size)


def test_n1_thin_png_uploads_stay_bounded(tmp_path):
    root = tmp_path / "idx"
    make_images(root / "images", 8)
    run_cli("embed", root / "images", "--out", root / "emb", *TINY, "--workers", "0", check=True)
    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    from test_server_hardening import rss_bytes

    pngs = [png_bytes(1, 20_000), png_bytes(20_000, 1)]
    with start_server(root / "index", tmp_path / "srv") as srv:
        with srv.client() as c:
            c.post("/api/search/image", files={"file": ("warm.png", png_bytes(64, 64), "image/png")})
        before = rss_bytes(srv.proc.pid)
        answers = []

        def upload(png: bytes) -> None:
            with srv.client() as c:
                resp = c.post("/api/search/image", files={"file": ("thin.png", png, "image/png")})
                answers.append((resp.status_code, resp.json()))

        threads = [threading.Thread(target=upload, args=(pngs[i % 2],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = rss_bytes(srv.proc.pid, "VmHWM")
    assert all(code == 200 and "results" in body or 400 <= code < 500 and "error" in body for code, body in answers), (
        answers
    )
    assert peak - before < 300 * 2**20, (before >> 20, peak >> 20)


def test_n3_any_caption_or_sidecar_bytes_are_stored_or_noted(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    members = [
        ("a.jpg", jpeg_bytes(1)),
        ("a.txt", b"red\x00barn"),
        ("b.jpg", jpeg_bytes(2)),
        ("b.json", b'{"caption": "half an emoji \\ud83d", "url": "u\\u0000v"}'),
        ("c.jpg", jpeg_bytes(3)),
        ("c.txt", "caf\xe9 cr\xe8me".encode("latin-1")),
        ("d.jpg", jpeg_bytes(4)),
        ("d.txt", "a barn \u2603".encode("utf-16")),
        ("e.jpg", jpeg_bytes(5)),
        ("e.txt", b"long " * 400_000),
        ("f.jpg", jpeg_bytes(6)),
        ("f.json", deep),
        ("g.jpg", jpeg_bytes(7)),
        ("g.json", b"{not json"),
        ("g.txt", b"\xff\xfe\x00"),
    ]
    tar = write_tar(tmp_path / "caps.tar", members)
    summary = run_embed([tar], tmp_path / "emb")
    assert summary["complete"] and summary["manifest"].n_embedded == 7
    done, _ = all_rows(tmp_path / "emb")
    meta = {Path(p.split("::")[-1]).stem: json.loads(m) for p, m in done.items()}
    assert meta["a"]["caption"] == "redbarn" and meta["a"]["notes"]
    assert meta["b"]["caption"] == "half an emoji \ufffd" and "\x00" not in meta["b"]["url"]
    assert meta["c"]["caption"] == "caf\xe9 cr\xe8me" and "cp1252" in meta["c"]["notes"][0]
    assert meta["d"]["caption"] == "a barn \u2603"
    assert len(meta["e"]["caption"]) <= 4096 and any("truncated" in n for n in meta["e"]["notes"])
    assert any("deep" in n for n in meta["f"]["notes"]) and any("JSON" in n for n in meta["g"]["notes"])
    assert run_embed([tar], tmp_path / "emb")["complete"]


def test_item2_any_exception_for_one_sample_is_its_recorded_failure(tmp_path, monkeypatch):
    images = make_images(tmp_path / "images", 4)
    paths = sorted(str(p) for p in images.rglob("*") if p.is_file())
    real = dataset_module.decode_image
    errors = iter([RecursionError("deep"), ValueError("weird mode"), Image.DecompressionBombError("bomb")])

    def flaky(source, **kw):
        return real(source, **kw) if source != paths[1] else (_ for _ in ()).throw(next(errors))

    monkeypatch.setattr(dataset_module, "decode_image", flaky)
    dataset = ImageDataset([0, 1], paths[:2], lambda img: torch.zeros(3), 224, 10**8)
    good, bad = dataset[0], dataset[1]
    assert good[2] == "" and "RecursionError" in bad[2] and bad[1] is None
    summary = run_embed(paths, tmp_path / "emb")
    _, failed = all_rows(tmp_path / "emb")
    assert summary["complete"] and list(failed) == [paths[1]] and "ValueError" in failed[paths[1]]


def test_n5_any_name_works_end_to_end_and_resumes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = ["a\x0cb.jpg", "x\ny.jpg", "u\u2028v.jpg", "c\rd\x85e.jpg", "back\\slash.jpg", "n" * 240 + ".jpg"]
    for i, name in enumerate(names):
        (src / name).write_bytes(jpeg_bytes(i))
    with open(os.fsencode(src) + b"/w\xffz.jpg", "wb") as f:  # not UTF-8: a surrogate-escaped name
        f.write(jpeg_bytes(9))
    write_tar(src / "t.tar", [("x\ny.jpg", jpeg_bytes(10)), ("u\u2028v.jpg", jpeg_bytes(11))])
    listed = list_inputs([src]).lines
    out = tmp_path / "emb"
    first = run_cli("embed", src, "--out", out, *TINY, "--workers", "0")
    assert first.returncode == 0 and "not done" not in first.stderr, first.stderr[-2000:]
    assert EmbDir(out).read_inputs() == listed and len(listed) == 9
    done, failed = all_rows(out)
    undecodable = [p for p in listed if "\udcff" in p]
    assert sorted(done) == sorted(set(listed) - set(undecodable)) and list(failed) == undecodable
    assert "not UTF-8" in failed[undecodable[0]]
    run_cli("index", out, "--out", tmp_path / "index", "--quiet", check=True)
    sha = EmbDir(out).inputs_sha256()
    again = run_cli("embed", src, "--out", out, *TINY, "--workers", "0")
    assert again.returncode == 0 and "differ" not in again.stderr and EmbDir(out).inputs_sha256() == sha


def test_n5_older_inputs_txt_still_reads(tmp_path):
    emb = EmbDir(tmp_path)
    emb.inputs_path.write_bytes(b"/data/a\\b.jpg\n/data/c\x0cd.jpg\n")  # as the old writer left it
    assert emb.read_inputs() == ["/data/a\\b.jpg", "/data/c\x0cd.jpg"]


def test_n8_sparse_member_is_a_recorded_failure_never_other_members_bytes(tmp_path):
    tar = write_sparse_tar(tmp_path / "sparse.tar", tmp_path / "scratch")
    samples = list_inputs([tar]).tar_samples
    sparse = [s for s in samples.values() if s.name == "a.jpg"]
    assert sparse and sparse[0].image is None and "sparse" in sparse[0].problem
    run_embed([tar], tmp_path / "emb")
    done, failed = all_rows(tmp_path / "emb")
    assert not done and any("sparse tar member not supported" in r for r in failed.values())


def test_n14_duplicate_keys_each_image_embedded_or_recorded(tmp_path):
    tar = write_tar(
        tmp_path / "dup.tar",
        [
            ("d.jpg", jpeg_bytes(1)),
            ("d.png", png_bytes(40, 30)),
            ("d.txt", b"a red barn"),
            ("c.jpg", jpeg_bytes(2)),
            ("c.jpg", jpeg_bytes(3)),
        ],
    )
    assert run_embed([tar], tmp_path / "emb")["complete"]
    done, failed = all_rows(tmp_path / "emb")
    members = sorted(p.split("::")[-1] for p in done)
    assert members == ["c.jpg", "d.jpg", "d.png"], members
    assert all(json.loads(m).get("caption") == "a red barn" for p, m in done.items() if "::d." in p)
    assert len(failed) == 1 and "duplicate member name" in next(iter(failed.values()))
