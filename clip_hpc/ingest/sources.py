"""Listing the inputs once, in a stable order, and cutting them into work units.

An image's global id is its line in EMB_DIR/inputs.txt; keeping that list stable across re-runs is what makes
resume and incremental indexing safe.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from clip_hpc.errors import UserError
from clip_hpc.ingest.tars import TarSample, expand_braces, index_tar, is_tar_path

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
    """os.scandir recursion: one stat-free pass, cheap on parallel file systems."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as exc:
            raise UserError(f"cannot read directory {d}: {exc.strerror}") from None
        for e in entries:
            if e.is_dir(follow_symlinks=True):
                stack.append(Path(e.path))
            elif is_image_path(e.name) or is_tar_path(e.name):
                yield os.path.abspath(e.path)


def read_file_list(file_list: str | os.PathLike) -> list[str]:
    path = Path(file_list)
    if not path.is_file():
        raise UserError(f"--file-list {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [os.path.abspath(line) for line in lines if line and not line.startswith("#")]


def _expanded(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """A quoted brace pattern (`data/{00000..00099}.tar`) that names no file is expanded as the shell would."""
    out = []
    for item in inputs:
        text = str(item)
        out.extend(map(Path, expand_braces(text)) if "{" in text and not os.path.exists(text) else [Path(text)])
    return out


def list_images(inputs: Sequence[str | os.PathLike] = (), file_list: str | os.PathLike | None = None) -> list[str]:
    """Directories recursively, files as given, plus a file list: absolute, sorted, de-duplicated. Tar shards
    (`.tar`) are listed as files here; `list_inputs` expands them into their members."""
    if not inputs and file_list is None:
        raise UserError("no inputs: give image files, tar shards or directories, or --file-list")
    found: set[str] = set()
    for path in _expanded(inputs):
        if path.is_dir():
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
    """`list_images`, with each tar replaced in place by its members in the tar's order (`TARPATH::MEMBER`)."""
    lines: list[str] = []
    samples: dict[str, TarSample] = {}
    for path in list_images(inputs, file_list):
        if not is_tar_path(path):
            lines.append(path)
            continue
        for sample in index_tar(path):
            lines.append(sample.line)
            samples[sample.line] = sample
    if not lines:
        raise UserError("the tar shards given hold no members")
    return Listing(lines, samples)


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
    gone = len(saved_set - set(listed))
    raise UserError(f"the inputs differ from the saved inputs.txt ({len(new)} new, {gone} missing); "
                    "pass --append to add the new files, or use a new --out directory")


def plan_work_units(n_inputs: int, shard_size: int) -> list[WorkUnit]:
    """Fixed-size units independent of the world size, so a re-run with another rank count reuses shards."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {shard_size}")
    return [WorkUnit(u, s, min(s + shard_size, n_inputs)) for u, s in enumerate(range(0, n_inputs, shard_size))]


def units_for_rank(units: Sequence[WorkUnit], rank: int, size: int) -> list[WorkUnit]:
    return [u for u in units if u.index % size == rank]
