"""Synthetic captioned images (coloured shapes on textured backgrounds) for the offline demo model.

Pure and seeded: image `i` of stream `seed` is a function of `(seed, i)` alone, so the training set, the fixed
held-out split and the demo images are reproducible anywhere, and no image depends on how many were asked for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from clip_hpc.formats.atomic import atomic_write_bytes

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 225, 30),
    "orange": (250, 140, 20),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
TEXTURES = ("plain", "striped", "dotted", "noisy")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
COUNT_WEIGHTS = (0.5, 0.25, 0.25)

TRAIN_SEED = 0  # the training stream; the held-out stream uses another seed, hence other images
HELDOUT_SEED = 1
HELDOUT_SIZE = 1000
DEMO_SEED = 2

_NUMBER_WORDS = {2: "two", 3: "three"}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
}
_TEXTURE_WORDS = {
    "plain": ("plain",),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted", "polka-dot"),
    "noisy": ("noisy", "grainy"),
}
_POSITION_WORDS = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}
_PREFIXES = ("{}", "a photo of {}", "a picture of {}", "an image of {}", "a drawing of {}", "an illustration of {}")
_BACKGROUNDS = (" on a {} background", " against a {} background", " on {}")
QUERY_TEMPLATES = ("{}", "a photo of {}", "a picture of {}")  # the colour-and-shape queries of the evaluation


@dataclass(frozen=True)
class Attrs:
    """What an image shows; relevance in the evaluation is defined on these, not on image identity."""

    shape: str
    colour: str
    count: int
    size: str
    position: str | None  # only for a single object
    background: str
    texture: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


T = TypeVar("T")


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def sample_attrs(rng: np.random.Generator) -> Attrs:
    colour = _pick(rng, tuple(COLOURS))
    count = int(rng.choice(COUNTS, p=COUNT_WEIGHTS))
    return Attrs(
        shape=_pick(rng, SHAPES),
        colour=colour,
        count=count,
        size=_pick(rng, SIZES),
        position=_pick(rng, POSITIONS) if count == 1 else None,
        background=_pick(rng, tuple(c for c in COLOURS if c != colour)),
        texture=_pick(rng, TEXTURES),
    )


def object_phrase(
    colour: str, shape: str, count: int = 1, size_word: str | None = None, shape_word: str | None = None
) -> str:
    """ "a red circle", "two big yellow squares": the noun phrase every caption is built around."""
    noun = shape_word or shape
    if count > 1:
        noun = noun + ("es" if noun.endswith("s") else "s")
    words = " ".join(w for w in (size_word, colour, noun) if w)
    return f"{_NUMBER_WORDS[count]} {words}" if count > 1 else f"{_article(words)} {words}"


def caption(attrs: Attrs, rng: np.random.Generator) -> str:
    """One of many paraphrases: optional size, position and background, varied wording."""
    size_word = _pick(rng, _SIZE_WORDS[attrs.size]) if rng.random() < 0.4 else None
    text = object_phrase(attrs.colour, attrs.shape, attrs.count, size_word, _pick(rng, _SHAPE_WORDS[attrs.shape]))
    if attrs.position and rng.random() < 0.4:
        text += " " + _pick(rng, _POSITION_WORDS[attrs.position])
    if rng.random() < 0.5:
        background = attrs.background
        if rng.random() < 0.5 and (attrs.texture != "plain" or rng.random() < 0.3):
            background = f"{_pick(rng, _TEXTURE_WORDS[attrs.texture])} {background}"
        text += _pick(rng, _BACKGROUNDS).format(background)
    return _pick(rng, _PREFIXES).format(text)


def colour_shape_queries() -> list[tuple[str, str, str]]:
    """Every (query text, colour, shape) of the evaluation: each colour-shape pair in each query template."""
    return [(t.format(object_phrase(c, s)), c, s) for t in QUERY_TEMPLATES for c in COLOURS for s in SHAPES]


# ---------------------------------------------------------------- rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * 1.1 * math.sin(a) + 0.15 * r)
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        return [
            (cx + rr * math.cos(a), cy + rr * math.sin(a))
            for k in range(10)
            for a, rr in [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.42 * r)]
        ]
    if shape == "cross":
        t = 0.33 * r
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _centres(attrs: Attrs, rng: np.random.Generator, r: float) -> list[tuple[float, float]]:
    """Object centres on a 64-unit canvas: a named region for one object, non-overlapping spots for several."""
    lo, hi = r + 1, 63 - r
    if attrs.count == 1:
        mid = (max(lo, 24), min(hi, 40))
        x_range, y_range = {
            "left": ((lo, max(lo, 20)), mid),
            "right": ((min(hi, 44), hi), mid),
            "top": (mid, (lo, max(lo, 20))),
            "bottom": (mid, (min(hi, 44), hi)),
            "center": ((28, 36), (28, 36)),
        }[attrs.position or "center"]
        return [(rng.uniform(*x_range), rng.uniform(*y_range))]
    for _ in range(200):
        pts = [(rng.uniform(lo, hi), rng.uniform(lo, hi)) for _ in range(attrs.count)]
        if all(math.dist(p, q) > 2 * r + 2 for i, p in enumerate(pts) for q in pts[:i]):
            return pts
    return [(lo + (hi - lo) * (i + 0.5) / attrs.count,) * 2 for i in range(attrs.count)]  # the diagonal always fits


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Lighter (amount > 0) or darker version of a colour, so that a texture keeps its background's colour."""
    target = 255 if amount > 0 else 0
    r, g, b = (int(c + (target - c) * abs(amount)) for c in rgb)
    return r, g, b


def _draw_texture(draw: ImageDraw.ImageDraw, attrs: Attrs, rng: np.random.Generator, side: int) -> None:
    base = COLOURS[attrs.background]
    ink = _shade(base, 0.35 if sum(base) < 300 else -0.25)
    if attrs.texture == "striped":
        step, width, angle = rng.uniform(0.12, 0.2) * side, 0.05 * side, rng.choice([0, 1, 2])
        for k in range(-side, 2 * side, max(2, int(step))):
            if angle == 0:
                draw.rectangle([0, k, side, k + width], fill=ink)
            else:
                sign = 1 if angle == 1 else -1
                draw.line([(k, 0), (k + sign * side, side)], fill=ink, width=max(1, int(width)))
    elif attrs.texture == "dotted":
        step, rad = rng.uniform(0.12, 0.18) * side, 0.025 * side
        off = rng.uniform(0, step)
        for y in np.arange(off, side, step):
            for x in np.arange(off, side, step):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=ink)


def render(attrs: Attrs, rng: np.random.Generator, size: int = 64, supersample: int = 2) -> np.ndarray:
    """HxWx3 uint8; drawn at `supersample` times the size and downscaled, for smooth edges."""
    side = size * supersample
    scale = side / 64
    img = Image.new("RGB", (side, side), COLOURS[attrs.background])
    draw = ImageDraw.Draw(img)
    _draw_texture(draw, attrs, rng, side)
    r = rng.uniform(*((10, 13) if attrs.size == "large" else (5, 7))) * (0.8 if attrs.count > 1 else 1.0)
    for cx, cy in _centres(attrs, rng, r):
        cx, cy, rr = cx * scale, cy * scale, r * scale
        if attrs.shape == "circle":
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=COLOURS[attrs.colour])
        else:
            draw.polygon(_shape_polygon(attrs.shape, cx, cy, rr), fill=COLOURS[attrs.colour])
    pixels = np.asarray(img.resize((size, size), Image.Resampling.BOX) if supersample > 1 else img)
    if attrs.texture == "noisy":
        noise = rng.normal(0, 18, size=(size, size, 1))
        pixels = np.clip(pixels.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return pixels


def make_example(seed: int, index: int, size: int = 64, n_captions: int = 1) -> tuple[np.ndarray, list[str], Attrs]:
    """Image `index` of stream `seed`: its pixels, `n_captions` paraphrased captions and its attributes."""
    rng = np.random.default_rng([seed, index])
    attrs = sample_attrs(rng)
    captions = [caption(attrs, rng) for _ in range(n_captions)]
    return render(attrs, rng, size), captions, attrs


def make_dataset(
    seed: int, n: int, size: int = 64, n_captions: int = 1, start: int = 0
) -> tuple[np.ndarray, list[list[str]], list[Attrs]]:
    """n examples as one uint8 array [n, size, size, 3], their captions and attributes."""
    pixels = np.empty((n, size, size, 3), dtype=np.uint8)
    captions, attrs = [], []
    for i in range(n):
        pixels[i], caps, att = make_example(seed, start + i, size, n_captions)
        captions.append(caps)
        attrs.append(att)
    return pixels, captions, attrs


def heldout_split(n: int = HELDOUT_SIZE, size: int = 64) -> tuple[np.ndarray, list[list[str]], list[Attrs]]:
    """The fixed held-out split: a stream of its own (HELDOUT_SEED), never used for training."""
    return make_dataset(HELDOUT_SEED, n, size)


def write_demo_images(
    out_dir: str | Path, n: int, seed: int = DEMO_SEED, size: int = 128
) -> list[tuple[Path, str, Attrs]]:
    """PNG files `out_dir/shape-NNNNN.png` plus `out_dir/captions.jsonl`; returns (path, caption, attrs) per image."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels, (text,), attrs = make_example(seed, i, size)
        path = out / f"shape-{i:05d}.png"
        Image.fromarray(pixels).save(path)
        rows.append((path, text, attrs))
    lines = [json.dumps({"path": p.name, "caption": t, **asdict(a)}) for p, t, a in rows]
    atomic_write_bytes(out / "captions.jsonl", ("\n".join(lines) + "\n").encode())
    return rows


# ---------------------------------------------------------------- evaluation


def colour_shape_relevance(queries: Sequence[tuple[str, str, str]], attrs: Sequence[Attrs]) -> np.ndarray:
    """[queries, images] bool: an image is relevant to "a red circle" when it shows red circles (any count)."""
    colours = np.array([a.colour for a in attrs])
    shapes = np.array([a.shape for a in attrs])
    return np.stack([(colours == c) & (shapes == s) for _, c, s in queries])


def retrieval_metrics(ranked: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@k: share of queries with a relevant image among the first k (ranked holds image rows, -1 for none);
    P@k: mean share of the first k that is relevant, a stricter figure reported beside it."""
    rows = np.arange(len(ranked))[:, None]
    hits = np.where(ranked >= 0, relevant[rows, np.maximum(ranked, 0)], False)
    out = {f"R@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}
    out[f"P@{max(ks)}"] = float(hits[:, : max(ks)].mean())
    return out
