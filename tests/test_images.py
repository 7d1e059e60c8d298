import subprocess
import sys
import warnings

import pytest
from PIL import Image

from clip_hpc.devdata.sample_images import bomb_png, write_bad_images
from clip_hpc.ingest.images import DecodeFailure, decode_image


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
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


def test_import_leaves_pil_globals_alone():
    """Importing the package must not change how PIL behaves for the rest of the process."""
    code = (
        "from PIL import Image, ImageFile; before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES); "
        "import clip_hpc.ingest.images, clip_hpc.ingest.embed, clip_hpc.search.engine; "
        "print(before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES), Image.MAX_IMAGE_PIXELS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "89478485"]


def test_pil_bomb_guard_and_our_limit_both_become_a_failure(bad_dir):
    out, _ = bad_dir
    assert decode_image(out / "bomb.png").kind == "too many pixels"  # PIL's own error (> 2x its limit)
    big = bomb_png(12_000, 8_000)  # 96 Mpx: over our default limit, under PIL's error threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # even PIL's DecompressionBombWarning raised as an error is handled
        assert decode_image(big).kind == "too many pixels"
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's own warning is left alone; the image is refused
        assert decode_image(big).kind == "too many pixels"
        assert decode_image(big, max_pixels=10_000).kind == "too many pixels"


def test_a_directory_named_where_an_image_was_expected_says_so(tmp_path):
    """A directory in --file-list was recorded as a bare `decode error`: say what it is and what to do."""
    (tmp_path / "album.jpg").mkdir()
    failure = decode_image(tmp_path / "album.jpg")
    assert isinstance(failure, DecodeFailure) and failure.kind == "a directory" and "input" in failure.detail
    assert decode_image(tmp_path / "gone.jpg").kind == "missing file"
