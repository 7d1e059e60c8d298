"""Make N varied sample images in real formats and sizes (mostly 640x480 JPEG, some PNG, WebP and odd sizes),
for tests, the demo and benchmarks. `write_bad_images` writes one file of each awkward kind a real collection holds.

The command line is scripts/make_sample_images.py; tests and benchmarks import the writers from here.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZES = [(640, 480)] * 7 + [(480, 640), (1024, 768), (320, 240), (1600, 1200), (800, 800)]


def synth_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A gradient background with random shapes: cheap, varied, and real JPEG work to decode."""
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] * np.ones((h, 1, 1))
    arr = (c0 * (1 - t) + c1 * t + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, max(11, w // 2))), y0 + int(rng.integers(10, max(11, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def skimage_photos() -> list[Image.Image]:
    try:
        from skimage import data
    except ImportError:
        return []
    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins"):
        try:
            photos.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
        except Exception:
            pass
    return photos


def write_samples(out: Path, n: int, seed: int = 0, photos: bool = False) -> list[Path]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    real = skimage_photos() if photos else []
    written = []
    for i in range(n):
        sub = out / f"dir{i % 4}"
        sub.mkdir(exist_ok=True)
        img = real[i % len(real)] if real and i % 10 == 0 else synth_image(rng, SIZES[i % len(SIZES)])
        kind = i % 10
        if kind == 7:
            path = sub / f"img{i:06d}.png"
            img.save(path)
        elif kind == 8:
            path = sub / f"img{i:06d}.webp"
            img.save(path, quality=80)
        else:
            path = sub / f"img{i:06d}.{'JPG' if kind == 9 else 'jpg'}"
            img.save(path, quality=int(rng.integers(70, 95)))
        written.append(path)
    return written


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny file whose header claims 400 Mpx: decoding it would eat gigabytes."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + _png_chunk(b"IEND", b"")


def write_bad_images(out: Path, seed: int = 1) -> dict[str, str]:
    """One file per awkward kind; the value says whether it must be embedded ('ok') or recorded as failed."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    good = synth_image(rng, (640, 480))
    buf = io.BytesIO()
    good.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    expect = {}
    (out / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    expect["truncated.jpg"] = "failed"
    (out / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = "failed"
    (out / "text.jpg").write_text("this is not an image\n")
    expect["text.jpg"] = "failed"
    (out / "bomb.png").write_bytes(bomb_png())
    expect["bomb.png"] = "failed"
    good.convert("CMYK").save(out / "cmyk.jpg")
    expect["cmyk.jpg"] = "ok"
    arr16 = (np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16)
    Image.fromarray(arr16).save(out / "gray16.png")
    expect["gray16.png"] = "ok"
    pal = good.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(out / "palette_alpha.png", transparency=0)
    expect["palette_alpha.png"] = "ok"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    good.resize((400, 200)).save(out / "exif_rotated.jpg", exif=exif.tobytes())
    expect["exif_rotated.jpg"] = "ok"
    good.convert("RGBA").save(out / "rgba.png")
    expect["rgba.png"] = "ok"
    good.save(out / "good.jpg")
    expect["good.jpg"] = "ok"
    return expect


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar in img2dataset's layout (`KEY.EXT` members, a sample's members together), written under a
    temporary name and renamed."""
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
    tmp.replace(path)
    return path


def captioned_samples(n: int, start: int = 0, seed: int = 0, size: int = 128) -> list[tuple[str, dict[str, bytes]]]:
    """`n` captioned shape images as img2dataset samples: `jpg`, `txt` (the caption) and `json` (key, url, size)."""
    import json

    from clip_hpc.devdata.captioned_shapes import make_example

    samples = []
    for i in range(start, start + n):
        pixels, captions, _ = make_example(seed, i, size=size)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        key = f"{i:09d}"
        meta = {
            "key": key,
            "url": f"https://example.org/shapes/{key}.jpg",
            "width": size,
            "height": size,
            "caption": captions[0],
            "status": "success",
        }
        samples.append((key, {"jpg": buf.getvalue(), "txt": captions[0].encode(), "json": json.dumps(meta).encode()}))
    return samples


def write_sample_tars(out: Path, n_tars: int, per_tar: int, seed: int = 0) -> list[Path]:
    """`out/{00000..}.tar`, each with `per_tar` captioned samples: what img2dataset would have downloaded."""
    return [write_tar(out / f"{t:05d}.tar", captioned_samples(per_tar, t * per_tar, seed)) for t in range(n_tars)]


def pack_into_tars(paths: list[Path], out: Path, per_tar: int) -> list[Path]:
    """The same image files, byte for byte, as tars of `per_tar` samples (keys in the given order)."""
    tars = []
    for t, lo in enumerate(range(0, len(paths), per_tar)):
        samples = [
            (f"{i:09d}", {p.suffix.lstrip(".").lower(): p.read_bytes()})
            for i, p in enumerate(paths[lo : lo + per_tar], lo)
        ]
        tars.append(write_tar(out / f"{t:05d}.tar", samples))
    return tars
