"""Just the columns of a shard that a filter needs, read with h5py: the scan reads the float16 vectors, ids and
caption similarities of every row but the names, captions and offsets only of the rows it keeps (decoding every
path string would cost more than the products)."""

from __future__ import annotations

import os
from typing import NamedTuple

import h5py
import numpy as np

from clip_hpc.formats.shard import FORMAT, VERSION, ShardError
from clip_hpc.formats.span_read import read_span


class ScanColumns(NamedTuple):
    ids: np.ndarray  # int64, ascending
    embeddings: np.ndarray  # (n, dim) as stored (float16)
    similarity: np.ndarray | None  # float32 image-caption cosine (NaN: no caption); None: embedded without --captions


class RowDetails(NamedTuple):
    """The kept rows' descriptions, in the order of the positions asked for."""

    paths: list[str]
    captions: list[str]
    meta: list[str]
    identities: list[str]
    offsets: np.ndarray
    sizes: np.ndarray


def _open(path: str | os.PathLike) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # h5py raises OSError/KeyError on a truncated or foreign file
        raise ShardError(f"{path}: unreadable shard ({type(exc).__name__}: {exc})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise ShardError(f"{path}: not a clip-hpc shard")
    version = str(f.attrs.get("version"))
    if version != str(VERSION):  # another layout: its datasets may mean something else
        f.close()
        raise ShardError(f"{path}: unsupported shard version {version}")
    return f


def read_scan_columns(
    path: str | os.PathLike, into: np.ndarray | None = None, around_cache: bool = False
) -> ScanColumns:
    """The contiguous datasets (how `write_shard` stores them) come by plain file reads at the offsets HDF5 reports:
    unlike h5py, they let go of the GIL, so the scan scores one shard while a thread reads the next (from a cold
    disk, h5py reading the ids held the GIL through the read: the scan then waited as long as a read alone took).
    Any other layout is read by h5py. The vectors are read into `into`, a spare uint8 buffer (`span_read.scratch`),
    when it has room: a fresh 50 MB array costs its page faults, about as much CPU time again as the read itself;
    `around_cache` reads what the page cache lacks around it (`span_read.read_span`)."""
    with _open(path) as f:
        names = ["ids", "embeddings"] + (["similarity"] if "similarity" in f else [])
        spans = {name: _span(f[name]) for name in names}
        read = {name: f[name][...] for name, span in spans.items() if span is None}  # not contiguous: h5py
    for name, span in spans.items():
        if span is not None:
            offset, shape, dtype = span
            nbytes = int(np.prod(shape)) * dtype.itemsize
            spare, around = (into, around_cache) if name == "embeddings" else (None, False)
            raw = read_span(path, offset, nbytes, spare, around)
            if len(raw) != nbytes:
                raise ShardError(f"{path}: truncated shard ({len(raw)} of {nbytes} bytes at offset {offset})")
            if raw.ctypes.data % dtype.itemsize:  # an odd offset: numpy and torch want the values aligned
                raw = raw.copy()
            read[name] = raw.view(dtype).reshape(shape)
    similarity = read.get("similarity")
    return ScanColumns(
        np.asarray(read["ids"]),
        np.asarray(read["embeddings"]),
        None if similarity is None else similarity.astype(np.float32),
    )


def scan_problem(columns: ScanColumns, first_id: int, unit_size: int, n: int, dim: int) -> str | None:
    """Pure: why a shard's scan columns are not the unit the manifest listed (ids in [first_id, first_id +
    unit_size), strictly ascending, `n` rows of `dim`), or None. The scan reads shards by offset, without
    `shard_check`, so a shard replaced or damaged after the manifest would otherwise pass: its rows scored under
    another unit's ids, duplicated in the results, or a shape error deep in the products."""
    ids, embeddings = columns.ids, columns.embeddings
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        return f"{embeddings.shape[-1] if embeddings.ndim else 0}-dim vectors, the manifest says {dim}"
    if len(ids) != len(embeddings) or (columns.similarity is not None and len(columns.similarity) != len(ids)):
        return f"{len(ids)} ids for {len(embeddings)} vectors"
    if len(ids) != n:
        return f"{len(ids)} vectors, the manifest lists {n}"
    if len(ids) and (ids.min() < first_id or ids.max() >= first_id + unit_size):
        return f"ids outside [{first_id}, {first_id + unit_size})"
    if np.any(np.diff(ids) <= 0):
        return "ids are not strictly ascending"
    return None


def _span(dataset: h5py.Dataset) -> tuple[int, tuple[int, ...], np.dtype] | None:
    """(file offset, shape, dtype) of a contiguous, non-empty dataset of numbers; None for any other (h5py reads it)."""
    offset = dataset.id.get_offset() if dataset.size and dataset.dtype.kind in "fiu" else None
    return None if offset is None else (int(offset), tuple(dataset.shape), dataset.dtype)


def backing_buffer(embeddings: np.ndarray) -> np.ndarray:
    """The buffer a shard's vectors were read into, to read another shard into once they are done with."""
    base = embeddings.base
    return base if isinstance(base, np.ndarray) else embeddings


def _text(values: np.ndarray) -> list[str]:
    """Strings as parquet can hold them: UTF-8 (an undecodable byte, which embed never lets through, becomes U+FFFD)."""
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def _rows(dataset: h5py.Dataset, positions: np.ndarray) -> np.ndarray:
    """The values at `positions` (any order). A number column is read whole and indexed (an h5py point selection
    of a sixth of a 50,000-row shard took 30x as long as reading it all); strings are picked out by h5py (decoding
    each costs more) unless a third or more of them are asked for."""
    if dataset.dtype.kind != "O" or 3 * len(positions) >= len(dataset):
        return dataset[...][positions]
    order = np.argsort(positions, kind="stable")  # h5py reads increasing positions only
    values = dataset[positions[order]]
    out = np.empty_like(values)
    out[order] = values
    return out


def read_row_details(path: str | os.PathLike, positions: np.ndarray) -> RowDetails:
    """The descriptions of the rows at `positions` (any order); columns an older shard lacks read as "" and -1."""
    positions = np.asarray(positions, np.int64)
    n = len(positions)
    with _open(path) as f:

        def text(name: str) -> list[str]:
            return _text(_rows(f[name], positions)) if name in f and n else [""] * n

        def ints(name: str) -> np.ndarray:
            return np.asarray(_rows(f[name], positions), np.int64) if name in f and n else np.full(n, -1)

        return RowDetails(
            text("paths"), text("captions"), text("meta"), text("identities"), ints("offsets"), ints("sizes")
        )
