import sys

import pytest

from clip_hpc.images import DecodeFailure, decode_image
from conftest import ROOT


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_sample_images import write_bad_images

    out = tmp_path_factory.mktemp("bad")
    return out, write_bad_images(out)


def test_each_awkward_kind_is_converted_or_explained(bad_dir):
    out, expect = bad_dir
    for name, outcome in expect.items():
        result = decode_image(out / name, min_size=224)
        if outcome == "ok":
            assert not isinstance(result, DecodeFailure), (name, result)
            assert result.mode == "RGB" and min(result.size) >= 200, name
        else:
            assert isinstance(result, DecodeFailure) and result.kind, name


def test_exif_rotation_and_sixteen_bit_scaling(bad_dir):
    out, _ = bad_dir
    rotated = decode_image(out / "exif_rotated.jpg")
    assert rotated.size == (200, 400)  # saved 400x200 with orientation 6
    gray = decode_image(out / "gray16.png")
    assert gray.getpixel((gray.size[0] - 1, gray.size[1] - 1))[0] > 250  # full-scale 16-bit is white, not clipped
    assert decode_image(out / "bomb.png", max_pixels=10_000_000).kind == "too many pixels"
    assert decode_image(b"").kind == "empty file"
