"""Small generators of hostile inputs for tests/test_wild_ingest.py: thin PNGs, odd captions, odd tar members."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth RGB PNG (a few hundred bytes even at 1x200,000): gradients, so resampling differences would show."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, 3)
    arr = np.stack(
        [
            128 + 100 * np.sin(y / 37.0 + x / 5.0 + phase[0]),
            128 + 100 * np.cos(y / 53.0 + phase[1]),
            (x * 7 + y + int(phase[2] * 40)) % 256,
        ],
        -1,
    )
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain ustar/PAX tar of (name, bytes) in order; duplicate names are kept (tarfile appends)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_sparse_tar(path: Path, scratch: Path) -> Path:
    """GNU tar -S of `a.jpg` (a real JPEG with an 8 KiB hole after it), then `z_secret.json`: the layout where a
    reader that trusts offset + size serves the secret as part of the image."""
    scratch.mkdir(parents=True, exist_ok=True)
    image = scratch / "a.jpg"
    with open(image, "wb") as f:
        f.write(jpeg_bytes())
        f.seek(8192, os.SEEK_CUR)
        f.write(b"end")
    (scratch / "z_secret.json").write_text(json.dumps({"secret": "x" * 20_000}))
    subprocess.run(
        ["tar", "-S", "--format=gnu", "-cf", str(path), "-C", str(scratch), "a.jpg", "z_secret.json"], check=True
    )
    return path
