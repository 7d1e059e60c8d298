"""Listing the inputs once, in a stable order, and cutting them into work units.

An image's global id is its line in EMB_DIR/inputs.txt; keeping that list stable across re-runs is what makes
resume and incremental indexing safe.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clip_hpc.errors import UserError
from clip_hpc.formats.tar_member import is_tar_path, loose_line
from clip_hpc.ingest.object_store import is_url, normal_url
from clip_hpc.ingest.tars import TarSample, expand_braces, index_tar
from clip_hpc.ingest.text import one_line

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass
class Listing:
    """The input lines in id order, and for each line that is a tar member where its bytes lie."""

    lines: list[str]
    tar_samples: dict[str, TarSample]


@dataclass(frozen=True)
class WorkUnit:
    """Unit `index` holds the global ids [start, stop); it becomes one shard, `EmbDir.shard_path(index)`."""

    index: int
    start: int
    stop: int

    @property
    def ids(self) -> range:
        return range(self.start, self.stop)


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _walk(root: Path) -> Iterable[str]:
    """os.scandir recursion: one stat-free pass over plain directories, cheap on parallel file systems.

    Each directory is entered once, by its (device, inode): a link back to an ancestor (`up -> ..`) would otherwise
    make the walk exponential, and a link to a walked directory would list its images twice. Plain directories come
    before linked ones, so an image keeps its real path. An entry whose type cannot be read (a link to itself:
    ELOOP) is treated as a file: with an image name it is listed and fails later with a reason, never the job."""
    stack: list[Path] = [root]
    linked: list[Path] = []
    seen: set[tuple[int, int]] = set()
    while stack or linked:
        d = stack.pop() if stack else linked.pop()
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(d), key=lambda e: e.name, reverse=True)
        except OSError as exc:
            raise UserError(f"cannot read directory {d}: {exc.strerror}") from None
        for e in entries:
            if _is_dir(e):
                (linked if e.is_symlink() else stack).append(Path(e.path))
            elif is_image_path(e.name) or is_tar_path(e.name):
                yield os.path.abspath(e.path)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:  # ELOOP and the like: not a directory we can enter
        return False


def read_file_list(file_list: str | os.PathLike) -> list[str]:
    """One path a line (LF or CRLF), blank lines and `#` comments skipped, relative paths from the working directory.
    Bytes as the file system spells names (undecodable ones surrogate-escaped, as os.scandir gives them), unless a
    BOM says UTF-16/32: a BOM is never part of the first path."""
    if is_url(file_list):
        raise UserError(
            f"--file-list {file_list}: a file list is a local file; to embed every image under a prefix, give the "
            "prefix itself as an input (s3://bucket/prefix/)"
        )
    path = Path(file_list)
    if not path.is_file():
        raise UserError(f"--file-list {path} does not exist")
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        text = data.decode("utf-32", errors="replace")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16", errors="replace")
    else:
        text = os.fsdecode(data.removeprefix(codecs.BOM_UTF8))
    lines = [line.strip() for line in text.split("\n")]  # not splitlines: U+2028, \x1c... may be in a name
    return [
        normal_url(line) if is_url(line) else os.path.abspath(line)
        for line in lines
        if line and not line.startswith("#")
    ]


def _expanded(inputs: Sequence[str | os.PathLike]) -> list[Path | str]:
    """A quoted brace pattern (`data/{00000..00099}.tar`) that names no file is expanded as the shell would. A URL
    stays a string (a Path would fold its `//`) and its pattern is always expanded: braces in keys are not worth a
    request per input."""
    out: list[Path | str] = []
    for item in inputs:
        text = str(item)
        if is_url(text):
            out.extend(expand_braces(normal_url(text)))
        else:
            out.extend(map(Path, expand_braces(text)) if "{" in text and not os.path.exists(text) else [Path(text)])
    return out


def _list_url(url: str) -> list[str]:
    """An object-store input: the object itself, or every image and tar under the prefix (sorted, like `_walk`)."""
    from clip_hpc.ingest.object_store import is_object, is_prefix, list_prefix

    try:
        if is_object(url):
            return [url]
        if is_prefix(url):
            return list_prefix(url, lambda u: is_image_path(u) or is_tar_path(u))
    except OSError as exc:  # no answer, no or bad credentials, no endpoint: said as such, never "does not exist"
        raise UserError(f"cannot read input {url}: {str(exc).removeprefix(f'{url}: ')}") from None
    raise UserError(f"input {url} does not exist (no such object or prefix)")


def list_images(inputs: Sequence[str | os.PathLike] = (), file_list: str | os.PathLike | None = None) -> list[str]:
    """Directories recursively, files as given, plus a file list: absolute, sorted, de-duplicated. Tar shards
    (`.tar`) are listed as files here; `list_inputs` expands them into their members."""
    if not inputs and file_list is None:
        raise UserError("no inputs: give image files, tar shards or directories, or --file-list")
    found: set[str] = set()
    for path in _expanded(inputs):
        if isinstance(path, str):
            found.update(_list_url(path))
        elif path.is_dir():
            found.update(_walk(path))
        elif path.is_file():
            found.add(os.path.abspath(path))
        else:
            raise UserError(f"input {path} does not exist")
    if file_list is not None:
        found.update(read_file_list(file_list))
    if not found:
        shown = ", ".join(map(str, inputs)) or str(file_list)
        raise UserError(f"no images ({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) found in {shown}")
    return sorted(found)


def list_inputs(inputs: Sequence[str | os.PathLike] = (), file_list: str | os.PathLike | None = None) -> Listing:
    """`list_images`, with each tar replaced in place by its members in the tar's order (`TARPATH::MEMBER`); a loose
    file whose name reads as such a line gets a line of its own, recorded as a failure (`tar_member.loose_line`)."""
    lines: list[str] = []
    samples: dict[str, TarSample] = {}
    paths = list_images(inputs, file_list)
    remote = _index_remote_tars([p for p in paths if is_url(p) and is_tar_path(p)])
    listed = set(paths)

    def is_file(path: str) -> bool:  # an object is a file when it was listed; a local path when it is one
        return path in listed or (not is_url(path) and os.path.isfile(path))

    for path in paths:
        if not is_tar_path(path):
            lines.append(loose_line(path, is_file))
            continue
        for sample in remote[path] if path in remote else index_tar(path):
            lines.append(sample.line)
            samples[sample.line] = sample
    if not lines:
        raise UserError("the tar shards given hold no members")
    return Listing(lines, samples)


def _index_remote_tars(urls: Sequence[str], threads: int = 16) -> dict[str, list[TarSample]]:
    """Object-store tars indexed side by side: each walks its headers with ranged reads, a round trip per member,
    so listing 100 tars one after another would be 100 times one tar's latency."""
    if not urls:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(urls))) as pool:
        return dict(zip(urls, pool.map(index_tar, urls)))


def reconcile_inputs(saved: Sequence[str], listed: Sequence[str], append: bool) -> list[str]:
    """Keep a re-run's ids stable: reuse the saved list, or extend it at the end with --append."""
    if not saved:
        return list(listed)
    saved_set = set(saved)
    new = [p for p in listed if p not in saved_set]
    if not new and (append or set(listed) == saved_set):
        return list(saved)
    if append:
        return list(saved) + new
    listed_set = set(listed)
    gone = [p for p in saved if p not in listed_set]
    if not new:  # nothing to append: an input listed before has been deleted or moved
        raise UserError(
            f"{len(gone)} input(s) of the saved inputs.txt are no longer there (first: {one_line(gone[0])}): put "
            "them back, or pass --append to go on with the saved list (any not yet embedded is recorded as failed), "
            "or use a new --out directory"
        )
    raise UserError(
        f"the inputs differ from the saved inputs.txt ({len(new)} new, {len(gone)} missing); "
        "pass --append to add the new files, or use a new --out directory"
    )


def plan_work_units(n_inputs: int, shard_size: int) -> list[WorkUnit]:
    """Fixed-size units independent of the world size, so a re-run with another rank count reuses shards."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {shard_size}")
    return [WorkUnit(u, s, min(s + shard_size, n_inputs)) for u, s in enumerate(range(0, n_inputs, shard_size))]


def units_for_rank(units: Sequence[WorkUnit], rank: int, size: int) -> list[WorkUnit]:
    return [u for u in units if u.index % size == rank]
