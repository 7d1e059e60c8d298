"""The subset as WebDataset tars, img2dataset-style: `tars/00000.tar`..., each sample `KEY.<ext>` with the
original bytes, `KEY.txt` its caption and `KEY.json` its record. Tar t holds results rows [t*S, (t+1)*S) (S
--samples-per-tar), so which sample lands where depends on the results alone; rank r writes the tars t % W == r,
each under a temporary name renamed when whole, so a tar at its final name is always a whole one."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_file
from clip_hpc.formats.tar_member import split_member_line
from clip_hpc.ingest.object_store import is_url
from clip_hpc.ingest.tars import Member, read_indexed_member


class Sample(NamedTuple):
    """One results row, as a tar needs it."""

    id: int
    path: str
    url: str
    caption: str
    score: float
    offset: int
    size: int


def original_bytes(sample: Sample) -> tuple[bytes, str]:
    """The image's bytes as they were given to embed, and the name they had (a tar member's name, else the path):
    a member is read at its stored offset, its header checked (a rewritten tar is an error, not other bytes)."""
    try:
        if sample.offset >= 0:
            located = split_member_line(sample.path)
            if located is None:
                raise OSError(f"{sample.path} is recorded as a tar member but names no tar")
            tar, member = located
            return read_indexed_member(tar, Member(sample.offset, sample.size), member), member
        if is_url(sample.path):
            from clip_hpc.ingest.object_store import read_object

            return read_object(sample.path), sample.path
        return Path(sample.path).read_bytes(), sample.path
    except OSError as exc:
        raise UserError(f"cannot read the image of id {sample.id} ({sample.path}): {exc}") from None


def extension(name: str) -> str:
    """The sample's image member suffix: the original one, lower-cased (webdataset keys end at the first dot)."""
    suffix = os.path.splitext(name.rpartition("/")[2])[1].lower().lstrip(".")
    return suffix if suffix and suffix.isalnum() else "bin"


def tar_numbers(n_rows: int, per_tar: int, rank: int, size: int) -> list[int]:
    """Pure: the tars rank `rank` of `size` writes."""
    return [t for t in range(-(-n_rows // per_tar)) if t % size == rank]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no clock in the bytes: a re-run writes the same tar
    tar.addfile(info, io.BytesIO(data))


def write_tar(dest: Path, samples: Sequence[Sample], first_key: int, on_sample: Callable[[], None]) -> None:
    """Write `samples` (keys first_key, first_key+1, ...) to `dest` through a temporary name, fsync'd, renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dest) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key_number, sample in enumerate(samples, first_key):
                data, name = original_bytes(sample)
                key = f"{key_number:09d}"
                record = {
                    "key": key,
                    "id": sample.id,
                    "path": sample.path,
                    "url": sample.url,
                    "caption": sample.caption,
                    "score": sample.score,
                }
                _add(tar, f"{key}.{extension(name)}", data)
                _add(tar, f"{key}.txt", sample.caption.encode())
                _add(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode())
                on_sample()
