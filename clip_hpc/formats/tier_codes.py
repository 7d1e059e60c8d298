"""tier_codes.npy: the re-rank tier's codes (index/rerank_tier.py), one uint8 row per global id as in vectors.npy,
zero rows for ids never embedded. Every rank writes the rows of its own ids with positioned writes, not through a
shared memory map: ranks on other nodes never write back each other's pages of the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def allocate_npy(path: Path, shape: tuple[int, ...], dtype: type) -> None:
    """A new .npy of zeros, its blocks allocated first: a write through a map into a full disk is a SIGBUS,
    `posix_fallocate` an OSError (ENOSPC) naming the file. Nothing is written through the header's map."""
    sparse = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del sparse
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None


def create_codes(path: Path, n_rows: int, code_size: int) -> None:
    """A zero-filled (n_rows, code_size) uint8 .npy, allocated (`allocate_npy`)."""
    allocate_npy(path, (n_rows, code_size), np.uint8)


def _data_offset(path: Path) -> tuple[int, int]:
    """Where the rows start in the file, and the row size."""
    codes = np.load(path, mmap_mode="r")
    return int(codes.offset), int(codes.shape[1])


def write_codes(path: Path, ids: np.ndarray, codes: np.ndarray) -> None:
    """Rows `ids` (sorted, unique) := `codes`, one positioned write per run of consecutive ids."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return
    offset, size = _data_offset(path)
    if codes.shape != (len(ids), size):
        raise ValueError(f"{path}: codes of shape {codes.shape} for {len(ids)} rows of {size} bytes")
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    fd = os.open(path, os.O_WRONLY)
    try:
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(ids)]):
            os.pwrite(fd, np.ascontiguousarray(codes[lo:hi]).tobytes(), offset + int(ids[lo]) * size)
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)


def copy_codes(source: Path, target: Path) -> None:
    """An older index's rows into a new, longer file (`index --update`): the same rows, then zeros."""
    old = np.load(source, mmap_mode="r")
    write_codes(target, np.arange(len(old)), np.asarray(old))
