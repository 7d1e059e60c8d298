"""WebDataset tar shards (img2dataset layout: `KEY.jpg`, `KEY.txt`, `KEY.json`) as inputs: index once, read by offset.

A tar is indexed once when the inputs are listed (member names, data offsets and sizes, from the headers alone);
afterwards every read is one seek and one `read(size)`, so no tar is ever scanned twice nor held in memory. Each
image member is one input line, `TARPATH::MEMBER`; a caption or json without an image, and the unreadable tail of
a truncated tar, are input lines too, so they are recorded as failures like a bad file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from clip_hpc.formats.tar_member import member_line
from clip_hpc.ingest.object_store import is_url
from clip_hpc.ingest.text import MAX_CAPTION_CHARS, clean_text, decode_text

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
UNREADABLE_PREFIX = "<unreadable after byte "
MAX_SIDECAR_BYTES = 1 << 20  # a json member larger than this is not read; a caption only up to its limit
CAPTION_READ_BYTES = 4 * MAX_CAPTION_CHARS + 4  # enough UTF-8 for MAX_CAPTION_CHARS characters
META_FIELDS = ("key", "url", "width", "height", "caption")
KNOWN_SUFFIXES = IMAGE_SUFFIXES | {".txt", ".json"}


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
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
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
    """WebDataset's rule: the key is the name up to the first dot of its last path component. A name whose
    extension by that rule is no known one but whose last suffix is (`photo.2019.jpg`, `photo.2019.txt`) is keyed
    by the name less that suffix (`photo.2019`): WebDataset would call it a field `2019.jpg` of sample `photo`,
    which no image route reads, so it would be neither embedded nor recorded."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    ext = "." + ext.lower() if dot else ""
    if ext not in KNOWN_SUFFIXES and "." in ext[1:]:
        longer, _, last = base.rpartition(".")
        if "." + last.lower() in KNOWN_SUFFIXES:
            stem, ext = longer, "." + last.lower()
    return (f"{directory}/{stem}" if directory else stem), ext


def _unread_tail(f: BinaryIO, stop: int, file_size: int) -> bool:
    """Whether bytes after where the headers ended hold anything but the end-of-archive zeros."""
    f.seek(stop)
    return any(f.read(min(file_size - stop, 1 << 20)))


def _special(info: tarfile.TarInfo) -> str:
    """Why a member's bytes cannot be read at its offset (tarfile's `offset_data` + `size` would run into the
    next members for a sparse file), or "" for a plain file."""
    if info.issparse():
        return "sparse tar member not supported"
    if info.isfile():
        return ""
    kind = (
        "symlink"
        if info.issym()
        else "hard link"
        if info.islnk()
        else "fifo"
        if info.isfifo()
        else "device"
        if info.isdev()
        else f"type {info.type!r}"
    )
    return f"special tar member not supported: {kind}"


def _unique(name: str, taken: set[str]) -> str:
    """A line for a member whose name came earlier in the tar: its own line, one no member has."""
    k = 2
    while f"{name} (duplicate {k})" in taken:
        k += 1
    return f"{name} (duplicate {k})"


@dataclass
class _KeyParts:
    """The members of one sample key: its images (name, member or None, problem or "") and its first caption and
    json."""

    images: list[tuple[str, Member | None, str]] = field(default_factory=list)
    caption: tuple[str, Member] | None = None
    meta: tuple[str, Member] | None = None


def _samples(path: str, infos: list[tarfile.TarInfo], file_size: int) -> list[TarSample]:
    """Every image member becomes a sample (a duplicate name or a special member as a failure); all images of a
    key share its first caption and json; a key with sidecars only is one 'no image' sample."""
    taken = {info.name for info in infos}
    keys: dict[str, _KeyParts] = {}
    seen: set[str] = set()
    for info in infos:
        key, ext = _sample_key(info.name)
        parts = keys.setdefault(key, _KeyParts())
        problem = _special(info)
        member = Member(info.offset_data, info.size)
        if ext in IMAGE_SUFFIXES:
            name = _unique(info.name, taken) if info.name in seen else info.name
            if name != info.name:
                problem = f"duplicate member name: {info.name} appears again in the tar; only the first is embedded"
            elif not problem and info.offset_data + info.size > file_size:
                problem = f"truncated tar: member {info.name} is cut at byte {file_size}"
            seen.add(info.name)
            parts.images.append((name, None if problem else member, problem))
        elif ext == ".txt" and not problem and parts.caption is None:
            parts.caption = (info.name, member)
        elif ext == ".json" and not problem and parts.meta is None:
            parts.meta = (info.name, member)
    out = []
    for key, parts in keys.items():
        caption, meta = parts.caption, parts.meta
        cut = [m for m in (caption, meta) if m and m[1].offset + m[1].size > file_size]
        side = (caption and caption[1], meta and meta[1])
        for name, image, problem in parts.images:
            if cut and not problem:
                problem = f"truncated tar: member {cut[0][0]} is cut at byte {file_size}"
            out.append(TarSample(path, name, image, *side, problem=problem))
        orphan = caption or meta
        if not parts.images and orphan and "." not in key.rpartition("/")[2]:
            # (a dotted key is a `_sample_key` fallback: an orphan `x.v2.txt` is a WebDataset field, no lost image)
            problem = (
                f"truncated tar: member {cut[0][0]} is cut at byte {file_size}"
                if cut
                else "no image: a caption or json member without an image beside it"
            )
            out.append(TarSample(path, orphan[0], None, *side, problem=problem))
    return out


def _open_for_listing(path: str) -> tuple[BinaryIO, int]:
    """The tar and its size: a local file, or an object walked by ranged reads (`object_store.RangedReader`)."""
    if is_url(path):
        from clip_hpc.ingest.object_store import open_ranged

        return open_ranged(path)  # type: ignore[return-value]  # RangedReader reads like a file, no full BinaryIO
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # open() of a FIFO waits for a writer forever; a device never ends
        raise tarfile.ReadError("not a regular file")
    return open(path, "rb"), st.st_size


def index_tar(path: str | os.PathLike) -> list[TarSample]:
    """The samples of one tar, in the tar's order, from its headers only (tarfile seeks over the data). A tar that
    is missing, or whose reads keep failing, is no dead job: what was listed stays, the rest is one failing line."""
    remote = is_url(path)
    path = str(path) if remote else os.path.abspath(path)
    infos: list[tarfile.TarInfo] = []
    stop, read_error = 0, None
    try:
        f, file_size = _open_for_listing(path)
        with f:
            tf = tarfile.open(fileobj=f, mode="r:")
            stopped_early = False
            while True:
                try:
                    info = tf.next()
                except tarfile.TarError:  # "unexpected end of data": the tar was cut; keep what was listed
                    stopped_early = True
                    break
                except OSError as exc:  # an object's reads kept failing, or a disk's (EIO)
                    stop, read_error = tf.offset, exc
                    break
                if info is None:
                    break
                if not info.isdir() and _sample_key(info.name)[1] in KNOWN_SUFFIXES:
                    infos.append(info)
            if read_error is None:
                stop = min(tf.offset, file_size)
                tail_unread = stop < file_size and (stopped_early or _unread_tail(f, stop, file_size))
    except tarfile.TarError as exc:  # not a tar at all (an empty or failed download): one failing line, go on
        if path.lower().endswith((".gz", ".tgz")):  # listed so that its images are not lost without a word
            why = "a compressed tar cannot be read by offset; decompress it (gunzip) first"
            return [TarSample(path, f"{UNREADABLE_PREFIX}0>", problem=f"not a tar: {why}")]
        return [TarSample(path, f"{UNREADABLE_PREFIX}0>", problem=f"not a tar: {exc}")]
    except FileNotFoundError:  # one failed download among thousands of tars: recorded like a missing image
        return [TarSample(path, f"{UNREADABLE_PREFIX}0>", problem="missing file")]
    except OSError as exc:
        return [TarSample(path, f"{UNREADABLE_PREFIX}0>", problem=f"read error: {str(exc)[:160]}")]
    out = _samples(path, infos, file_size)
    if read_error is not None:
        out.append(
            TarSample(
                path,
                f"{UNREADABLE_PREFIX}{stop}>",
                problem=f"read error: the headers after byte {stop} could not be read: {str(read_error)[:120]}",
            )
        )
    elif tail_unread and not any(sample.problem.startswith("truncated") for sample in out):
        out.append(
            TarSample(
                path,
                f"{UNREADABLE_PREFIX}{stop}>",
                problem=f"truncated tar: the headers after byte {stop} could not be read",
            )
        )
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


MAX_PREFETCH = 64 << 20  # at most this many bytes of a tar held per worker for a batch


def sample_span(sample: TarSample) -> tuple[int, int, int]:
    """(start, stop, bytes read) of what is read of a sample: its image with its header (`read_indexed_member`) and
    the read part of its sidecars."""
    image = sample.image and Member(sample.image.offset - tarfile.BLOCKSIZE, sample.image.size + tarfile.BLOCKSIZE)
    parts = [m for m in (image, sample.caption, sample.meta) if m is not None]
    read = {
        m: min(m.size, CAPTION_READ_BYTES) if m is sample.caption else m.size
        for m in parts
        if not (m is sample.meta and m.size > MAX_SIDECAR_BYTES)
    }
    return min(m.offset for m in read), max(m.offset + n for m, n in read.items()), sum(read.values())


def one_read(spans: Sequence[tuple[int, int, int]], slack: int = 64 << 10) -> tuple[int, int] | None:
    """One range covering `spans` when they lie close together (img2dataset writes a sample's files, and a unit's
    samples, side by side): one request instead of one per member. None when the gaps would cost more."""
    start, stop = min(s[0] for s in spans), max(s[1] for s in spans)
    worth = stop - start <= sum(s[2] for s in spans) + slack * len(spans) and stop - start <= MAX_PREFETCH
    return (start, stop) if worth else None


class ChangedTarError(OSError):
    """A tar member's stored offset no longer holds its header: the tar was rewritten after it was indexed."""


def read_indexed_member(tar: str | os.PathLike, member: Member, name: str, handle: BinaryIO | None = None) -> bytes:
    """`read_member`, for a member located by an index built earlier: the 512-byte header just before its data
    must still be a regular member of this name and size, or the tar has changed since (a rewritten tar would
    otherwise hand out whatever now sits at that offset: another member's pixels, a secret). Header and data come in
    one read (one ranged GET for an object, or none beyond the sample's prefetch through `handle`)."""
    header_at = member.offset - tarfile.BLOCKSIZE
    if header_at < 0:
        raise ChangedTarError(f"the tar changed after indexing: no header before {name!r} at offset {member.offset}")
    if handle is None and is_url(tar):
        from clip_hpc.ingest.object_store import read_range

        block = read_range(str(tar), header_at, member.offset + member.size)
    else:
        with contextlib.nullcontext(handle) if handle is not None else open(tar, "rb") as f:
            f.seek(header_at)
            block = f.read(tarfile.BLOCKSIZE + member.size)
    _check_header(block[: tarfile.BLOCKSIZE], name, member)
    if len(block) != tarfile.BLOCKSIZE + member.size:
        raise OSError(
            f"truncated tar: {max(len(block) - tarfile.BLOCKSIZE, 0)} of {member.size} bytes at offset {member.offset}"
        )
    return block[tarfile.BLOCKSIZE :]


def _check_header(header: bytes, name: str, member: Member) -> None:
    if not header_describes(header, name, member.size):
        raise ChangedTarError(
            f"the tar changed after indexing: {name!r} is no longer at offset {member.offset}; "
            "re-run clip-hpc embed and index"
        )


def header_describes(header: bytes, name: str, size: int) -> bool:
    """Pure: whether a raw tar header block is a regular member's, of this size and, for a name the ustar fields
    hold verbatim (ASCII, at most 100 bytes), of this name. A longer or non-ASCII name came from a PAX or GNU
    extension header, and each writer puts something else in the ustar field (the first 100 bytes: Python, GNU
    tar; 99 bytes: GNU tar's oldgnu; an abbreviation with '...': libarchive; '?' or raw bytes for non-ASCII), so
    such a member is judged by its type, size and checksum alone: demanding one spelling failed real members."""
    if len(header) != tarfile.BLOCKSIZE or header[156:157] not in (b"0", b"\0", b"7"):
        return False
    try:
        if int(header[148:156].split(b"\0")[0].strip() or b"-1", 8) not in tarfile.calc_chksums(header):  # type: ignore[attr-defined]  # tarfile's own helper, not in typeshed
            return False
        if tarfile.nti(header[124:136]) != size:  # type: ignore[attr-defined]  # as above
            return False
    except (ValueError, tarfile.HeaderError):
        return False
    spelled = name.encode("utf-8", "surrogateescape")
    if len(spelled) > 100 or not spelled.isascii():
        return True
    stored = header[:100].split(b"\0")[0]
    prefix = header[345:500].split(b"\0")[0] if header[257:263] == b"ustar\x00" else b""
    return (prefix + b"/" + stored if prefix else stored) == spelled


def decode_caption(data: bytes, size: int | None = None) -> tuple[str, list[str]]:
    """A caption member's bytes (perhaps only its first `CAPTION_READ_BYTES` of `size`) as storable text, and notes
    on what had to be repaired or cut."""
    cut = size is not None and size > len(data)
    text, notes = decode_text(data, cut=cut)
    text, more = clean_text(text)
    if cut and not any("truncated" in note for note in more):
        more.append(f"caption: truncated from {size} bytes to {MAX_CAPTION_CHARS} characters")
    return text, notes + more


def _scalar(value: Any) -> Any:
    """A json field kept as a finite number, a bool or a clean string; anything else (lists, dicts, NaN) is None."""
    if isinstance(value, bool) or (isinstance(value, int) and abs(value) < 1 << 63):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return clean_text(value, what="json")[0] if isinstance(value, str) else None


def decode_meta(data: bytes) -> tuple[dict[str, Any], list[str]]:
    """The json sidecar's `META_FIELDS` as clean scalars, and notes; anything unusable (invalid or too deep json, a
    list) becomes {} with a note: metadata never fails an image."""
    text, notes = decode_text(data)
    try:
        value = json.loads(text)
    except RecursionError:
        return {}, notes + ["json: nested too deeply, ignored"]
    except ValueError as exc:
        return {}, notes + [f"json: not valid JSON ({str(exc)[:80]}), ignored"]
    if not isinstance(value, dict):
        return {}, notes + [f"json: a {type(value).__name__}, not an object, ignored"]
    fields = {k: _scalar(value[k]) for k in META_FIELDS if k in value}
    dropped = sorted(k for k, v in fields.items() if v is None and value[k] is not None)
    if dropped:
        notes.append(f"json: fields {', '.join(dropped)} are not plain values, ignored")
    if fields.get("caption") is not None and not isinstance(value["caption"], str):  # `true` is not the text "True"
        notes.append(f"json: caption is a {type(value['caption']).__name__}, not text, ignored")
        fields["caption"] = None
    return {k: v for k, v in fields.items() if v is not None}, notes


def sample_meta(sample: TarSample, caption: str, meta: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """The shard's per-image `meta` JSON: the img2dataset fields that matter (key from the name if absent), and
    `notes` on repaired captions and sidecars."""
    fields = {k: meta[k] for k in META_FIELDS if k in meta and meta[k] is not None}
    fields.setdefault("key", clean_text(_sample_key(sample.name)[0].rpartition("/")[2], what="key")[0])
    if caption and "caption" not in fields:
        fields["caption"] = caption
    if notes:
        fields["notes"] = list(notes)
    return json.dumps(fields, ensure_ascii=False, sort_keys=True)
