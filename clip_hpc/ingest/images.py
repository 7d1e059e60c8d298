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
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_hpc.errors import UserError

# PIL's globals stay untouched (no import-time side effects): `max_pixels` is checked per call, before decoding,
# and PIL's own bomb guard (an error above twice its limit) becomes the same "too many pixels" failure.
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb threshold


@dataclass(frozen=True)
class DecodeFailure:
    """Why an image could not be used; `kind` groups failures in summaries."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten any mode to 8-bit RGB; transparency goes onto white, 16-bit data is scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _reduced(img: Image.Image, min_size: int | None) -> Image.Image:
    """Shrunk by a whole factor while the short side stays >= `min_size`: what draft does for JPEG, for every
    format, so a 9400x9400 PNG is neither converted to RGB nor kept at full size. A mode PIL cannot reduce
    (palette) is returned as is, and reduced after its RGB conversion."""
    factor = min(img.size) // min_size if min_size else 1
    if factor < 2:
        return img
    try:
        return img.reduce(factor)
    except (ValueError, NotImplementedError):
        return img


def decode_image(source: str | os.PathLike | bytes | BinaryIO, *, min_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | DecodeFailure:
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
            if os.path.getsize(source) == 0:
                return DecodeFailure("empty file")
        with Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:
                return DecodeFailure("too many pixels", f"{w}x{h} > {max_pixels}")
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img.load()
            img = _reduced(img, min_size)  # before exif_transpose, which copies the image
            img = ImageOps.exif_transpose(img) or img
            return _reduced(_to_rgb(img), min_size)
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


def as_query_image(source: Image.Image | str | os.PathLike | bytes | BinaryIO, *, min_size: int | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A query image as the embed path would see it: an already-decoded image passes (as RGB), anything else goes
    through `decode_image` with the same `min_size`; a failure is a one-line `UserError`, not an exception."""
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else _to_rgb(source)
    image = decode_image(source, min_size=min_size, max_pixels=max_pixels)
    if isinstance(image, DecodeFailure):
        name = "" if isinstance(source, (bytes, bytearray)) or hasattr(source, "read") else f" {source}"
        raise UserError(f"cannot read image{name}: {image}")
    return image
