"""The device JPEG route (ingest/gpu_decode.py), run on the CPU: torchvision's decode_jpeg takes the same code path
with device="cpu", so the routing, the fallbacks and the failure records are tested here; nvJPEG itself only on a
GPU (scripts/gpu_check.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_hpc.devdata.sample_images import synth_image, write_bad_images, write_samples
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.ingest.embed import EmbedConfig, embed
from clip_hpc.ingest.gpu_decode import (
    CpuRoute,
    DevicePreprocess,
    DeviceRoute,
    choose_route,
    decode_on_device,
    gpu_decodable,
    prefetched,
)
from clip_hpc.ingest.image_dataset import collate
from clip_hpc.ingest.images import decode_image
from clip_hpc.model.loading import load_model

CPU = torch.device("cpu")


def jpeg(size: tuple[int, int] = (640, 480), seed: int = 0, **save: object) -> bytes:
    buf = io.BytesIO()
    synth_image(np.random.default_rng(seed), size).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def bad_quant_table(data: bytes) -> bytes:
    """A JPEG whose header passes the scan but whose components name a quantisation table it lacks: both
    decoders must refuse it."""
    out = bytearray(data)
    sof = out.find(b"\xff\xc0")
    for c in range(out[sof + 9]):
        out[sof + 10 + 3 * c + 2] = 3
    return bytes(out)


@pytest.fixture(scope="module")
def tiny():
    return load_model("clip-hpc-tiny", "none", device="cpu")


def test_header_scan_takes_only_what_the_device_decodes_like_pil(tmp_path: Path) -> None:
    write_bad_images(tmp_path)
    taken = {p.name for p in tmp_path.iterdir() if gpu_decodable(p.read_bytes(), 10**9)}
    assert taken == {"good.jpg"}  # not cmyk, exif_rotated, truncated, PNGs, text, empty
    gray = io.BytesIO()
    Image.new("L", (64, 64), 128).save(gray, "JPEG")
    assert gpu_decodable(gray.getvalue(), 10**9)
    assert not gpu_decodable(jpeg(progressive=True), 10**9)
    assert not gpu_decodable(jpeg((640, 480)), 640 * 480 - 1)  # the pixel bound, before any decode
    assert gpu_decodable(jpeg((640, 480)), 640 * 480)


def test_device_preprocess_matches_open_clip_within_one_level(tiny) -> None:
    """Full-resolution PIL + open_clip's transform against decode_jpeg + DevicePreprocess: a uint8 level is
    1/255/std ~ 0.015 after normalising."""
    preprocess = DevicePreprocess(tiny.model.visual.preprocess_cfg, CPU)
    for size in ((640, 480), (480, 640), (1600, 1200), (300, 300)):
        data = jpeg(size)
        ref = tiny.preprocess(decode_image(data))
        got = preprocess(decode_on_device([torch.frombuffer(bytearray(data), dtype=torch.uint8)], CPU))[0]
        assert got.shape == ref.shape
        assert (got - ref).abs().max() < 0.05 and (got - ref).abs().mean() < 0.005, size


def test_a_batch_the_decoder_rejects_falls_back_per_image() -> None:
    good, bad = jpeg(), bad_quant_table(jpeg((64, 48)))
    assert gpu_decodable(bad, 10**9)
    out = decode_on_device([torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in (good, bad, good)], CPU)
    assert out[0] is not None and out[1] is None and out[2] is not None


def test_embed_device_route_records_the_same_failures_as_the_cpu_route(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_samples(images, 24)
    write_bad_images(images / "bad")
    (images / "bad" / "bad_tables.jpg").write_bytes(bad_quant_table(jpeg((64, 48))))  # device fails, CPU records
    shards = {}
    for decode in ("cpu", "gpu"):
        embed(
            EmbedConfig(
                inputs=[str(images)],
                out=str(tmp_path / decode),
                model="clip-hpc-tiny",
                pretrained="none",
                workers=1,
                progress=False,
                decode=decode,
                device="cpu",
                dtype="float32",
            )
        )
        shards[decode] = EmbDir(tmp_path / decode).read_shard(0)
    cpu, gpu = shards["cpu"], shards["gpu"]
    failures = {d: dict(zip(map(int, s.failed_ids), s.failed_reasons)) for d, s in shards.items()}
    assert failures["gpu"] == failures["cpu"]
    assert len(failures["cpu"]) == 5 and any(r.startswith("decode error") for r in failures["cpu"].values())
    assert list(gpu.ids) == list(cpu.ids)
    cosine = np.sum(np.asarray(cpu.embeddings) * np.asarray(gpu.embeddings), axis=1)
    assert cosine.min() > 0.99  # the CPU route decodes JPEGs at draft scale, the device at full size


def test_route_choice(tiny) -> None:
    jpgs, pngs = ["a.jpg", "b.JPEG", "c.png"], ["a.png", "b.webp", "c.jpg"]
    assert isinstance(choose_route("auto", tiny, jpgs, collate), CpuRoute)  # no CUDA model: the workers decode
    assert isinstance(choose_route("gpu", tiny, pngs, collate), DeviceRoute)
    assert isinstance(choose_route("cpu", tiny, jpgs, collate), CpuRoute)
    with pytest.raises(UserError):
        choose_route("nvjpeg", tiny, jpgs, collate)


def test_auto_takes_the_device_route_for_a_cuda_model_on_jpegs(tiny, monkeypatch) -> None:
    """A stand-in for a CUDA model (only the device type is read when choosing): auto needs mostly JPEGs."""

    class OnCuda:
        model, name, device = tiny.model, tiny.name, torch.device("cuda", 0)

    assert isinstance(choose_route("auto", OnCuda(), ["a.jpg", "b.jpg", "c.png"], collate), DeviceRoute)
    assert isinstance(choose_route("auto", OnCuda(), ["a.png", "b.png", "c.jpg"], collate), CpuRoute)


def test_prefetched_keeps_order_raises_the_producers_error_and_stops_with_the_consumer() -> None:
    assert list(prefetched(iter(range(50)), 2)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    got = prefetched(failing(), 2)
    assert next(got) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(got)
    produced = []

    def counting():
        for i in range(10**6):
            produced.append(i)
            yield i

    early = prefetched(counting(), 2)
    assert [next(early) for _ in range(3)] == [0, 1, 2]
    early.close()  # the consumer stops: the producer ends at its next item, not after a million
    import time

    time.sleep(0.5)
    assert len(produced) < 10
