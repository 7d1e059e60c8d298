"""R6: one decode costs the decoded file plus what it keeps, whatever the mode. PIL cannot reduce 16-bit, palette or
1-bit images, and 16-bit went through a full-size float64 copy: a 194 KB 16-bit PNG of 9,400 x 9,400 cost 2.2 GB."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_hpc.ingest.images import DecodeFailure, decode_image
from conftest import ROOT

SIDE = 6000  # 36 Mpx: large enough that a full-size copy shows, small enough to write and decode in seconds
MIB = 1 << 20
# bytes a pixel PIL holds the decoded file in (its own storage: RGB and CMYK are 4 bytes, 1-bit is a byte)
SOURCE_BYTES = {"I;16": 2, "I": 4, "F": 4, "P": 1, "1": 1, "CMYK": 4, "L": 1, "RGB": 4}
EXTRA_MIB = 48  # beyond the decoded file: the kept image, one band of float64 rows, PIL's PNG/TIFF buffers

PEAK_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    from clip_hpc.ingest.images import decode_image

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    data = open(sys.argv[1], "rb").read()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current one
    base = status("VmRSS")
    image = decode_image(data, min_size=224)
    print(json.dumps([status("VmHWM") - base, list(image.size)]))
    """
)


def gradient(dtype: type, top: float) -> np.ndarray:
    """SIDE x SIDE, 0 in the top-left corner to `top` in the bottom-right: compresses well, spans the full range."""
    ramp = np.linspace(0.0, 1.0, SIDE, dtype=np.float64)
    return ((ramp[:, None] + ramp[None, :]) / 2 * top).astype(dtype)


def write_modes(out: Path) -> dict[str, Path]:
    """One large image per awkward mode, as the file a user would upload."""
    files = {}
    for mode, image, fmt in (
        ("I;16", Image.fromarray(gradient(np.uint16, 65535)), "png"),
        ("I", Image.fromarray(gradient(np.int32, 65535)), "tiff"),
        ("F", Image.fromarray(gradient(np.float32, 65535.0)), "tiff"),
        ("P", Image.fromarray(gradient(np.uint8, 255)).convert("P"), "png"),
        ("1", Image.fromarray(gradient(np.uint8, 255)).convert("1"), "png"),
        ("CMYK", Image.fromarray(gradient(np.uint8, 255)).convert("CMYK"), "tiff"),
    ):
        files[mode] = out / f"{mode.replace(';', '_')}.{fmt}"
        image.save(files[mode], compression="tiff_deflate") if fmt == "tiff" else image.save(files[mode])
        with Image.open(files[mode]) as back:
            assert back.mode == mode and back.size == (SIDE, SIDE), (mode, back.mode)
    return files


@pytest.fixture(scope="module")
def large_images(tmp_path_factory) -> dict[str, Path]:
    return write_modes(tmp_path_factory.mktemp("modes"))


def decode_peak(path: Path) -> tuple[int, list[int]]:
    """Bytes one decode of `path` adds to a fresh interpreter's peak RSS (a process each: freed heap pages would
    hide the next decode's cost), and the decoded size."""
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    extra, size = json.loads(proc.stdout)
    return extra, size


def test_r6_one_decode_costs_the_decoded_file_plus_what_it_keeps_in_every_mode(large_images):
    over = {}
    for mode, path in large_images.items():
        extra, size = decode_peak(path)
        assert min(size) >= 224 and max(size) < SIDE // 2, (mode, size)
        bound = SIDE * SIDE * SOURCE_BYTES[mode] + EXTRA_MIB * MIB
        if extra > bound:
            over[mode] = f"{extra / MIB:.0f} MiB > {bound / MIB:.0f} MiB"
    assert not over, over


def test_r6_sixteen_bit_still_maps_the_full_range_when_reduced(large_images):
    image = decode_image(large_images["I;16"], min_size=224)
    assert not isinstance(image, DecodeFailure)
    pixels = np.asarray(image)
    assert pixels.min() <= 2 and pixels.max() >= 250  # 0..65535 -> 0..255, neither clipped nor compressed
    gray = decode_image(large_images["F"], min_size=224)
    assert not isinstance(gray, DecodeFailure) and np.asarray(gray).max() >= 250  # > 255: scaled as 16-bit
