"""Robust image decoding shared by embedding, uploads and thumbnails.

Real collections hold CMYK scans, 16-bit PNGs, palette images with transparency, rotated phone photos, truncated
files and decompression bombs; each either becomes a sane RGB image or a short reason, never an exception.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from clip_hpc.errors import UserError

# PIL's globals stay untouched (no import-time side effects): `max_pixels` is checked per call, before decoding,
# and PIL's own bomb guard (an error above twice its limit) becomes the same "too many pixels" failure.
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb threshold
# Beyond this aspect ratio the model's "resize the short side to S, centre-crop S x S" would first build an
# S x (S * ratio) image (1x200,000 pixels -> 224 x 44.8M); such an image is cut to its centre before resizing.
MAX_ASPECT = 16
_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit resampling (Resample.c)


@dataclass(frozen=True)
class DecodeFailure:
    """Why an image could not be used; `kind` groups failures in summaries."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_UNREDUCIBLE = ("1", "P", "PA", "I;16", "I;16B", "I;16L", "I;16N")  # PIL cannot reduce them (PA: it averages indices)
BAND_PIXELS = 1 << 20  # source pixels converted at a time: 8 MiB of float64, whatever the image's size
_ORIENTATION = 0x0112  # EXIF Orientation -> the transpose that undoes it (as ImageOps.exif_transpose)
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _band_rows(width: int, multiple: int = 1) -> int:
    """Rows per band: about BAND_PIXELS pixels, a whole number of `multiple`-row boxes."""
    return multiple * max(1, BAND_PIXELS // max(1, width * multiple))


def _high_bit_to_gray(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float pixels as 8-bit gray, scaled to the full range (16-bit: 65535; I and F: 65535 where
    any pixel is above 255, else 255), one band of rows at a time: a full-size float64 copy costs 8 bytes a pixel."""
    sixteen = img.mode.startswith("I;16")
    hi = 65535.0 if sixteen or float(img.getextrema()[1]) > 255 else 255.0  # type: ignore[arg-type]  # I, F: numbers
    w, h = img.size
    out = np.empty((h, w), dtype=np.uint8)
    rows = _band_rows(w)
    for y in range(0, h, rows):
        band = np.asarray(img.crop((0, y, w, min(h, y + rows))), dtype=np.float64)
        out[y : y + len(band)] = np.clip(band / hi * 255.0, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten any mode to 8-bit RGB; transparency goes onto white, 16-bit data is scaled, not clipped."""
    if img.mode in _HIGH_BIT:
        img = _high_bit_to_gray(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _reduced_rgb(img: Image.Image, factor: int) -> Image.Image:
    """`_to_rgb(img).reduce(factor)` one band of whole `factor`-row boxes at a time, for the modes PIL cannot reduce
    (16-bit, palette, 1-bit): their full-size RGB copy would cost 4 bytes a source pixel, 16-bit's float 24."""
    w, h = img.size
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    rows = _band_rows(w, factor)
    for y in range(0, h, rows):
        out.paste(_to_rgb(img.crop((0, y, w, min(h, y + rows)))).reduce(factor), (0, y // factor))
    return out


def _as_rgb(img: Image.Image, min_size: int | None) -> Image.Image:
    """8-bit RGB, shrunk by a whole factor while the short side stays >= `min_size`: what draft does for JPEG, for
    every format and mode, so a 9400x9400 PNG is neither converted at full size nor kept at it. Modes PIL reduces
    are reduced first (the result is small), the others converted and reduced a band at a time."""
    factor = min(img.size) // min_size if min_size else 1
    if factor < 2:
        return _to_rgb(img)
    if img.mode in _UNREDUCIBLE:
        return _reduced_rgb(img, factor)
    return _to_rgb(img.reduce(factor))


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    """`img` turned as its source's EXIF orientation says (ImageOps.exif_transpose, on the small converted image)."""
    method = _TRANSPOSES.get(orientation)
    return img.transpose(method) if method is not None else img


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5), evaluated in the same order of operations as Resample.c."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = ((((x - 5) * x + 8) * x) - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _coefficients(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """PIL's bicubic taps (Resample.c `precompute_coeffs` + `normalize_coeffs_8bpc`) for output rows
    [first, first + count) of a resize from `in_size` to `out_size`: each row's first source row, and per tap the
    fixed-point weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    center = (np.arange(first, first + count) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = [
        np.where(t < xmax, _bicubic(((xmin + t) - center + 0.5) * (1.0 / filterscale)), 0.0)
        for t in range(int(np.ceil(support)) * 2 + 1)
    ]
    total = np.zeros(count)
    for weights in taps:  # summed tap by tap, as Resample.c does
        total = total + weights
    total[total == 0] = 1.0
    fixed = [np.trunc(w / total * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int64) for w in taps]
    return xmin, fixed


def _resample_rows(rows: np.ndarray, start: int, in_size: int, out_size: int, first: int, count: int) -> np.ndarray:
    """Rows [first, first + count) of PIL's 8-bit bicubic resize of axis 0 from `in_size` to `out_size`, bit for bit,
    given the source rows from `start` on (`rows`); the other `out_size - count` rows are never built."""
    xmin, fixed = _coefficients(in_size, out_size, first, count)
    acc = np.full((count, *rows.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int64)
    shape = (count,) + (1,) * (rows.ndim - 1)
    for t, weights in enumerate(fixed):
        source = np.minimum(xmin + t - start, len(rows) - 1)  # a zero weight where the tap is past the end
        acc += rows[source].astype(np.int64) * weights.reshape(shape)
    return (np.clip(acc, 0, (1 << (_PRECISION_BITS + 8)) - 1) >> _PRECISION_BITS).astype(np.uint8)


def centre_for_model(img: Image.Image, size: int, max_aspect: int = MAX_ASPECT) -> Image.Image:
    """A thin RGB image cut to what the model's own preprocessing (bicubic resize of the short side to `size`, then
    a centre crop of `size` x `size`) keeps of it, plus a margin up to `max_aspect`:1 for thumbnails: the same
    pixels after that preprocessing, at a cost of at most `size` x `size * max_aspect` pixels, where the standard
    path builds `size` x `size * aspect` (gigabytes for a 1x200,000 strip). Other images are returned as they are:
    with a short side of `size` or more the standard path only shrinks, so it costs less than the decoded image.
    Only enlargement is reproduced, where PIL always runs its horizontal pass first.
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short >= size or long <= short * max_aspect:
        return img
    resized = int(size * long / short)  # torchvision's Resize(size): the long side's new length
    offset = int(round((resized - size) / 2.0))  # torchvision's CenterCrop start
    margin = max(0, min(offset, resized - size - offset, (size * max_aspect - size) // 2))
    first, count = offset - margin, size + 2 * margin
    if h >= w:  # PIL's horizontal pass (the short side here) comes first, on the source rows the kept rows use
        xmin, fixed = _coefficients(h, resized, first, count)
        lo, hi = int(xmin[0]), min(int(xmin[-1]) + len(fixed), h)
        narrow = np.asarray(img.crop((0, lo, w, hi)).resize((size, hi - lo), Image.Resampling.BICUBIC))
        return Image.fromarray(_resample_rows(narrow, lo, h, resized, first, count), "RGB")
    columns = _resample_rows(np.asarray(img).transpose(1, 0, 2), 0, w, resized, first, count)
    strip = Image.fromarray(np.ascontiguousarray(columns.transpose(1, 0, 2)), "RGB")
    return strip.resize((count, size), Image.Resampling.BICUBIC)


def decode_image(
    source: str | os.PathLike | bytes | BinaryIO, *, min_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image | DecodeFailure:
    """Open, bound, draft-decode, EXIF-rotate and convert to RGB.

    `min_size` lets JPEG decode at a reduced scale (Image.draft) that still covers the model's input: decoding,
    not inference, is the bottleneck of CLIP embedding on every real system.
    """
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                return DecodeFailure("empty file")
            source = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            if not os.path.exists(source):
                return DecodeFailure("missing file")
            if os.path.isdir(source):  # a --file-list line is read as a file: a directory there lists nothing
                return DecodeFailure("a directory", "give it as an input to embed the images in it")
            if os.path.getsize(source) == 0:
                return DecodeFailure("empty file")
        with Image.open(source) as file:
            img: Image.Image = file
            w, h = img.size
            if w * h > max_pixels:
                return DecodeFailure("too many pixels", f"{w}x{h} > {max_pixels}")
            if min_size and file.format == "JPEG":
                file.draft("RGB", (min_size, min_size))
            file.load()
            orientation = int(file.getexif().get(_ORIENTATION, 1))
            img = _upright(_as_rgb(img, min_size), orientation)  # converted small, then turned (no full-size copy)
            return centre_for_model(img, min_size) if min_size else img
    except UnidentifiedImageError:
        return DecodeFailure("not an image")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning under -W error
        return DecodeFailure("too many pixels", str(exc)[:120])
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        kind = "truncated" if "truncated" in text or isinstance(exc, EOFError) else "decode error"
        return DecodeFailure(kind, text[:160])
    except Exception as exc:  # a decoder bug must cost one image, not the run
        return DecodeFailure("decode error", f"{type(exc).__name__}: {str(exc)[:120]}")


def as_query_image(
    source: Image.Image | str | os.PathLike | bytes | BinaryIO,
    *,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """A query image as the embed path would see it: an already-decoded image passes (as RGB), anything else goes
    through `decode_image` with the same `min_size`; a failure is a one-line `UserError`, not an exception."""
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else _to_rgb(source)
    image = decode_image(source, min_size=min_size, max_pixels=max_pixels)
    if isinstance(image, DecodeFailure):
        name = "" if isinstance(source, (bytes, bytearray)) or hasattr(source, "read") else f" {source}"
        raise UserError(f"cannot read image{name}: {image}")
    return image
