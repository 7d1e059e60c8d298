"""The subset as WebDataset tars, img2dataset-style: `tars/00000.tar`..., each sample `KEY.<ext>` with the
original bytes, `KEY.txt` its caption and `KEY.json` its record. Tar t holds results rows [t*S, (t+1)*S) (S
--samples-per-tar), so which sample lands where depends on the results alone; rank r writes the tars t % W == r,
each under a temporary name renamed when whole, so a tar at its final name is always a whole one.

An image that cannot be read, or is no longer the one embedded (its recorded identity differs), is left out of its
tar (its key is then missing: keys stay the results rows', so which sample lands where does not change) and listed
with the reason in `tars/NNNNN.skipped.json`, written before the tar is renamed; the run gathers them."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from clip_hpc.formats.atomic import atomic_file, atomic_write_json
from clip_hpc.formats.input_identity import check_content, check_stat
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
    identity: str = ""  # as embed recorded it; "" checks nothing


class Skipped(NamedTuple):
    """A sample left out of its tar, and why."""

    id: int
    path: str
    reason: str


def original_bytes(sample: Sample) -> tuple[bytes, str]:
    """The image's bytes as they were given to embed, and the name they had (a tar member's name, else the path):
    a member is read at its stored offset, its header checked, and all of them against the identity embed recorded
    (a rewritten tar or a replaced file is an OSError, never other bytes under this sample's record)."""
    if sample.offset >= 0:
        located = split_member_line(sample.path)
        if located is None:
            raise OSError(f"{sample.path} is recorded as a tar member but names no tar")
        tar, member = located
        data = read_indexed_member(tar, Member(sample.offset, sample.size), member)
        return check_content(sample.identity, data, sample.path), member
    if is_url(sample.path):
        from clip_hpc.ingest.object_store import read_object

        return check_content(sample.identity, read_object(sample.path), sample.path), sample.path
    with open(sample.path, "rb") as f:
        check_stat(sample.identity, os.fstat(f.fileno()), sample.path)
        return f.read(), sample.path


def skipped_path(tar: Path) -> Path:
    return tar.with_suffix(".skipped.json")


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


def write_tar(dest: Path, samples: Sequence[Sample], first_key: int, on_sample: Callable[[], None]) -> list[Skipped]:
    """Write `samples` (keys first_key, first_key+1, ...) to `dest` through a temporary name, fsync'd, renamed;
    those that cannot be read are left out and listed beside it (`skipped_path`) before the rename, and returned."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    skipped: list[Skipped] = []
    with atomic_file(dest) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key_number, sample in enumerate(samples, first_key):
                try:
                    data, name = original_bytes(sample)
                except OSError as exc:  # gone, unreadable or changed since embed: this sample only
                    skipped.append(Skipped(sample.id, sample.path, str(exc) or type(exc).__name__))
                    on_sample()
                    continue
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
        if skipped:  # a killed run's list for this tar is overwritten, or removed when nothing is missing now
            atomic_write_json(skipped_path(dest), [s._asdict() for s in skipped])
        else:
            skipped_path(dest).unlink(missing_ok=True)
    return skipped


def gather_skipped(tars: Sequence[Path]) -> list[Skipped]:
    """Rank 0: the skipped samples of every tar, in tar order (each tar's list was written with it)."""
    found: list[Skipped] = []
    for tar in tars:
        listed = skipped_path(tar)
        if listed.exists():
            found.extend(
                Skipped(int(s["id"]), str(s["path"]), str(s["reason"])) for s in json.loads(listed.read_text())
            )
    return found
