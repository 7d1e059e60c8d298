"""WebDataset tars for the tar tests, written by the `webdataset` library's own TarWriter (a test dependency; the
code path reads tars with the standard library), from the same image files the loose-file tests embed."""

from __future__ import annotations

import json
from pathlib import Path

from clip_hpc.devdata.sample_images import write_bad_images
from clip_hpc.ingest.sources import list_images


def caption_of(i: int) -> str:
    return f"sample number {i} showing {('a red kite', 'a blue boat', 'green hills', 'a red barn')[i % 4]}"


def write_wds_tars(images: Path, out: Path, per_tar: int) -> list[str]:
    """The images under `images` (in `list_images` order) as tars of `per_tar` samples with a caption and json;
    returns the captions in id order."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    paths = list_images([images])
    captions = []
    for t, lo in enumerate(range(0, len(paths), per_tar)):
        with wds.TarWriter(str(out / f"{t:05d}.tar")) as sink:
            for i, path in enumerate(paths[lo : lo + per_tar], lo):
                key = f"{i:09d}"
                captions.append(caption_of(i))
                sink.write(
                    {
                        "__key__": key,
                        Path(path).suffix.lstrip(".").lower(): Path(path).read_bytes(),
                        "txt": captions[-1],
                        "json": json.dumps(
                            {"key": key, "url": f"https://ex.org/{key}", "width": 1, "height": 1}
                        ).encode(),
                    }
                )
    return captions


def write_bad_tars(out: Path, scratch: Path) -> dict[str, str]:
    """`90000.tar`: a non-image, a caption without an image, a good image; `90001.tar`: cut inside its third
    image. Returns member -> 'ok' or the expected failure kind."""
    import webdataset as wds

    bad = write_bad_images(scratch)
    good = (scratch / "good.jpg").read_bytes()
    with wds.TarWriter(str(out / "90000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": (scratch / "text.jpg").read_bytes(), "txt": "not an image"})
        sink.write({"__key__": "b", "txt": "a caption whose image is missing"})
        sink.write({"__key__": "c", "jpg": good, "txt": "a good one"})
    with wds.TarWriter(str(out / "90001.tar")) as sink:
        for key in "def":
            sink.write({"__key__": key, "jpg": good, "txt": f"caption {key}"})
    whole = (out / "90001.tar").read_bytes()
    cut = whole.index(good, whole.index(b"f.jpg")) + len(good) // 2
    (out / "90001.tar").write_bytes(whole[:cut])
    assert bad["text.jpg"] == "failed"
    return {
        "90000.tar::a.jpg": "not an image",
        "90000.tar::b.txt": "no image",
        "90000.tar::c.jpg": "ok",
        "90001.tar::d.jpg": "ok",
        "90001.tar::e.jpg": "ok",
        "90001.tar::f.jpg": "truncated tar",
    }
