"""WebDataset tar shards (img2dataset layout: `KEY.jpg`, `KEY.txt`, `KEY.json`) as inputs: index once, read by offset.

A tar is indexed once when the inputs are listed (member names, data offsets and sizes, from the headers alone);
afterwards every read is one seek and one `read(size)`, so no tar is ever scanned twice nor held in memory. Each
image member is one input line, `TARPATH::MEMBER`; a caption or json without an image, and the unreadable tail of
a truncated tar, are input lines too, so they are recorded as failures like a bad file.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from clip_hpc.errors import UserError
from clip_hpc.formats.tar_member import is_tar_path, member_line  # noqa: F401  (is_tar_path: sources.py's import)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
UNREADABLE_PREFIX = "<unreadable after byte "
MAX_SIDECAR_BYTES = 1 << 20  # a caption or json member larger than this is not read (it is not a caption)
META_FIELDS = ("key", "url", "width", "height", "caption")


@dataclass(frozen=True)
class Member:
    """Where a member's bytes lie in its tar."""

    offset: int
    size: int


@dataclass(frozen=True)
class TarSample:
    """One input line from a tar: its image member and sidecars, or the reason it cannot be embedded."""

    tar: str
    name: str
    image: Member | None = None
    caption: Member | None = None
    meta: Member | None = None
    problem: str = ""

    @property
    def line(self) -> str:
        return member_line(self.tar, self.name)


def expand_braces(pattern: str) -> list[str]:
    """`data/{00000..00099}.tar` (zero padding kept) and `{a,b}`, as the shell would have done unquoted."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    seq = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if seq:
        lo, hi = int(seq.group(1)), int(seq.group(2))
        width = len(seq.group(1)) if seq.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [pattern]
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the name up to the first dot of its last path component."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ("." + ext.lower() if dot else "")


def _unread_tail(f: BinaryIO, stop: int, file_size: int) -> bool:
    """Whether bytes after where the headers ended hold anything but the end-of-archive zeros."""
    f.seek(stop)
    return any(f.read(min(file_size - stop, 1 << 20)))


def index_tar(path: str | os.PathLike) -> list[TarSample]:
    """The samples of one tar, in the tar's order, from its headers only (tarfile seeks over the data)."""
    path = os.path.abspath(path)
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            tf = tarfile.open(fileobj=f, mode="r:")
            stopped_early = False
            while True:
                try:
                    info = tf.next()
                except tarfile.TarError:  # "unexpected end of data": the tar was cut; keep what was listed
                    stopped_early = True
                    break
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = _sample_key(info.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                slot = "image" if ext in IMAGE_SUFFIXES else {".txt": "caption", ".json": "meta"}.get(ext)
                if slot is not None and slot not in samples[key]:
                    samples[key][slot] = (info.name, Member(info.offset_data, info.size))
            stop = min(tf.offset, file_size)
            tail_unread = stop < file_size and (stopped_early or _unread_tail(f, stop, file_size))
    except tarfile.TarError as exc:  # not a tar at all (an empty or failed download): one failing line, go on
        return [TarSample(path, f"{UNREADABLE_PREFIX}0>", problem=f"not a tar: {exc}")]
    except OSError as exc:
        raise UserError(f"cannot read tar {path}: {exc.strerror or exc}") from None
    out = []
    for key in order:
        parts = samples[key]
        image = parts.get("image")
        caption, meta = parts.get("caption"), parts.get("meta")
        if not (image or caption or meta):
            continue  # only other kinds of member (.cls, ...): nothing to embed, nothing lost
        name = (image or caption or meta)[0]
        problem = "" if image else "no image: a caption or json member without an image beside it"
        cut = [m for m in (image, caption, meta) if m and m[1].offset + m[1].size > file_size]
        if cut:
            problem = f"truncated tar: member {cut[0][0]} is cut at byte {file_size}"
        out.append(TarSample(path, name, image and image[1], caption and caption[1], meta and meta[1], problem))
    if tail_unread and not any(sample.problem.startswith("truncated") for sample in out):
        out.append(TarSample(path, f"{UNREADABLE_PREFIX}{stop}>",
                             problem=f"truncated tar: the headers after byte {stop} could not be read"))
    return out


def read_member(tar: str | os.PathLike, member: Member, handle: BinaryIO | None = None) -> bytes:
    """Exactly the member's bytes: one seek, one read; a short read means the tar was cut (OSError)."""
    f = handle or open(tar, "rb")
    try:
        f.seek(member.offset)
        data = f.read(member.size)
    finally:
        if handle is None:
            f.close()
    if len(data) != member.size:
        raise OSError(f"truncated tar: {len(data)} of {member.size} bytes at offset {member.offset}")
    return data


def decode_caption(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def decode_meta(data: bytes) -> dict[str, Any]:
    """The json sidecar as a dict; anything else (invalid json, a list) becomes {}: metadata never fails an image."""
    try:
        value = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def sample_meta(sample: TarSample, caption: str, meta: dict[str, Any]) -> str:
    """The shard's per-image `meta` JSON: the img2dataset fields that matter (key from the name if absent)."""
    fields = {k: meta[k] for k in META_FIELDS if k in meta and meta[k] is not None}
    fields.setdefault("key", _sample_key(sample.name)[0].rpartition("/")[2])
    if caption and "caption" not in fields:
        fields["caption"] = caption
    return json.dumps(fields, ensure_ascii=False, sort_keys=True)


def meta_key_url(meta_json: str) -> tuple[str, str]:
    """(key, url) out of a shard's `meta` string; ("", "") for a loose file."""
    if not meta_json:
        return "", ""
    try:
        value = json.loads(meta_json)
    except ValueError:
        return "", ""
    return str(value.get("key") or ""), str(value.get("url") or "")

