"""A fresh corpus of what web-scale data holds, for the standing wild-data test: loose files and WebDataset tars
with every family of oddity the red teams found, several of each, drawn with varied parameters from a seed.

Nothing here knows how clip-hpc handles a case; the test only asks that every input ends embedded or recorded,
that a re-run changes nothing, and that what is served is byte for byte what was indexed."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clip_hpc.devdata.sample_images import write_bad_images

NAME_ODDITIES = [
    "new\nline",
    "carriage\rreturn",
    "form\x0cfeed",
    "ls\u2028sep",
    "ps\u2029sep",
    "nel\x85next",
    "tab\there",
    "emoji \U0001f431 cat",
    "-rf",
    "quote ' \" both",
    "ümlaut é",
    "back\\slash",
    "x::y",
    "trailing space ",
    "#hash?query",
    "%41percent",
]


@dataclass
class Corpus:
    """Where the inputs are, and what the test may rely on: files that must be embedded (plain good images)."""

    root: Path
    inputs: list[Path]
    must_embed: set[str] = field(default_factory=set)  # file names (loose) or member names (tars)


def png_bytes(width: int, height: int, rng: random.Random) -> bytes:
    """A valid RGB PNG, written by hand row by row so a 1×200,000 image costs a few hundred bytes to make."""
    colour = bytes(rng.randrange(256) for _ in range(3))
    raw = b"".join(b"\x00" + colour * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def photo_jpeg(rng: random.Random, size: tuple[int, int]) -> bytes:
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3))
    img = Image.fromarray(arr.astype(np.uint8)).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randrange(60, 95), progressive=rng.random() < 0.3)
    return buf.getvalue()


def thin_sizes(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """1×N and N×1 (and 2×N) strips, N from 5,000 to 40,000: few pixels, absurd aspect ratios."""
    sizes = []
    for i in range(n):
        long_side, short_side = rng.randrange(5_000, 40_000), rng.choice([1, 1, 2, 3])
        sizes.append((long_side, short_side) if i % 2 else (short_side, long_side))
    return sizes


def write_loose(root: Path, rng: random.Random) -> set[str]:
    """Loose files: thin strips, the known-bad kinds, odd formats, and names no one planned for."""
    root.mkdir(parents=True)
    must = set()
    for i, (w, h) in enumerate(thin_sizes(rng, rng.randrange(4, 7))):
        (root / f"thin-{i}-{w}x{h}.png").write_bytes(png_bytes(w, h, rng))
    for name, kind in write_bad_images(root / "bad", seed=rng.randrange(1000)).items():
        if kind == "ok":
            must.add(name)
    oddities = rng.sample(NAME_ODDITIES, k=rng.randrange(8, len(NAME_ODDITIES)))
    for i, odd in enumerate(oddities):
        name = f"{odd}-{i}.jpg"
        (root / name).write_bytes(photo_jpeg(rng, (rng.randrange(64, 400), rng.randrange(64, 400))))
        must.add(name)
    raw_name = os.fsencode(root) + b"/latin1-\xe9t\xe9-\xff.jpg"  # not UTF-8: a file system allows it
    with open(raw_name, "wb") as f:
        f.write(photo_jpeg(rng, (120, 90)))
    (root / ("long-" + "n" * 200 + ".jpg")).write_bytes(photo_jpeg(rng, (80, 80)))
    must.add("long-" + "n" * 200 + ".jpg")
    odd_dir = root / "dir::with.tar::colons"
    odd_dir.mkdir()
    (odd_dir / "inside.jpg").write_bytes(photo_jpeg(rng, (100, 140)))
    must.add("inside.jpg")
    return must


def add_member(tf: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    for key, value in kw.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if info.isreg() else None)


def odd_captions(rng: random.Random) -> list[tuple[str, bytes]]:
    """(sidecar extension, bytes): every kind of text a scraper writes."""
    return [
        ("txt", b"red\x00barn"),
        ("json", b'{"caption": "half an emoji \\ud83d"}'),
        ("txt", "caf\u00e9 latin-1".encode("latin-1")),
        ("txt", "\ufeffutf-16 text".encode("utf-16")),
        ("txt", b"x" * rng.randrange(1_100_000, 1_600_000)),
        ("json", b"[" * 100_000 + b"]" * 100_000),
        ("json", b"{not json"),
        ("json", b"42"),
        ("txt", b"\xff\xfe\xfd invalid utf-8 \xc3"),
        ("json", json.dumps({"caption": "ok", "url": "\udcff" * 3}, ensure_ascii=True).encode()),
        ("txt", "bidi \u202e reversed \u0000 and nul".encode("utf-8", "surrogatepass")),
    ]


def write_tars(root: Path, rng: random.Random) -> set[str]:
    """Tars with odd captions and sidecars, duplicate keys, special members, odd member names, a cut tail."""
    root.mkdir(parents=True)
    must = set()
    with tarfile.open(root / "captions.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for i, (ext, text) in enumerate(odd_captions(rng)):
            key = f"c{i:03d}"
            add_member(tf, f"{key}.jpg", photo_jpeg(rng, (rng.randrange(64, 300), rng.randrange(64, 300))))
            add_member(tf, f"{key}.{ext}", text)
            must.add(f"{key}.jpg")
    with tarfile.open(root / "members.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        good = photo_jpeg(rng, (160, 120))
        add_member(tf, "d.jpg", good)
        add_member(tf, "d.png", png_bytes(50, 40, rng))  # the same key twice
        add_member(tf, "e.jpg", good)
        add_member(tf, "e.jpg", photo_jpeg(rng, (90, 90)))  # the same name twice
        add_member(tf, "link.jpg", b"", type=tarfile.SYMTYPE, linkname="d.jpg")
        add_member(tf, "hard.jpg", b"", type=tarfile.LNKTYPE, linkname="d.jpg")
        add_member(tf, "dir.jpg", b"", type=tarfile.DIRTYPE, mode=0o755)
        add_member(tf, "fifo.jpg", b"", type=tarfile.FIFOTYPE)
        for odd in rng.sample(NAME_ODDITIES, k=6):
            add_member(tf, f"{odd}.jpg", photo_jpeg(rng, (70, 70)))
            must.add(f"{odd}.jpg")
        add_member(tf, "../escape.jpg", photo_jpeg(rng, (60, 60)))
        add_member(tf, "/abs/olute.jpg", photo_jpeg(rng, (60, 60)))
        for i, (w, h) in enumerate(thin_sizes(rng, 3)):
            add_member(tf, f"thin{i}.png", png_bytes(w, h, rng))
        add_member(tf, "z_secret.json", b'{"secret": "must never be served as an image"}')
    sparse = write_sparse_tar(root / "sparse.tar", rng)
    if sparse is not None:
        must |= sparse
    whole = (root / "members.tar").read_bytes()
    (root / "cut.tar").write_bytes(whole[: rng.randrange(len(whole) // 3, 2 * len(whole) // 3)])
    nested = root / "t::d"
    nested.mkdir()
    with tarfile.open(nested / "colon.tar", "w") as tf:
        add_member(tf, "k.jpg", photo_jpeg(rng, (100, 100)))
    must.add("k.jpg")
    return must


def write_sparse_tar(path: Path, rng: random.Random) -> set[str] | None:
    """A GNU sparse member (`tar -S`) between ordinary ones; None where GNU tar is not installed."""
    if shutil.which("tar") is None:
        return None
    scratch = path.parent / ".sparse-src"
    scratch.mkdir()
    (scratch / "a_good.jpg").write_bytes(photo_jpeg(rng, (90, 70)))
    with open(scratch / "m_sparse.jpg", "wb") as f:
        f.write(photo_jpeg(rng, (40, 40)))
        f.truncate(rng.randrange(20_000, 60_000))  # a hole after the data
    (scratch / "z_secret.json").write_text('{"secret": "sparse neighbour"}')
    subprocess.run(
        [
            "tar",
            "-S",
            "--format=gnu",
            "-cf",
            str(path),
            "-C",
            str(scratch),
            "a_good.jpg",
            "m_sparse.jpg",
            "z_secret.json",
        ],
        check=True,
    )
    shutil.rmtree(scratch)
    return {"a_good.jpg"}


def make_corpus(root: Path, seed: int) -> Corpus:
    rng = random.Random(seed)
    must = write_loose(root / "loose", rng) | write_tars(root / "tars", rng)
    return Corpus(root, [root / "loose", root / "tars"], must)
