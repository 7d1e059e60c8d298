"""What each INDEX_DIR file must be: recorded in index.json when the index is built, checked when search or serve
loads it. FAISS and numpy read the big files through memory maps, and a map past the end of a truncated file is a
SIGBUS at the first query, not an exception; so every damaged file is found here, named in one line, first.

Cheap checks only (a load must stay fast at web scale): each file's size and a hash of its first and last KiB from
the record, and for an index.json without one, what the files' own headers say they need.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clip_hpc.errors import UserError

if TYPE_CHECKING:
    import faiss

HASH_SPAN = 1024  # bytes hashed at each end of a file
DAMAGED = "the index is damaged; rebuild it with clip-hpc index"
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_HEADER = 100


class DamagedIndex(UserError):
    """A file of an INDEX_DIR is not what it must be (truncated, overwritten, not the format it should be)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} {problem}: {DAMAGED}")


def describe_file(path: Path) -> dict[str, Any]:
    """What index.json records of one file: its size and the hashes of its first and last KiB."""
    size = path.stat().st_size
    return {"bytes": size, "head": _digest(path, 0), "tail": _digest(path, max(0, size - HASH_SPAN))}


def describe_npy(path: Path) -> dict[str, Any]:
    shape, dtype, _ = npy_header(path)
    return {**describe_file(path), "shape": list(shape), "dtype": dtype.str}


def _digest(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(HASH_SPAN)).hexdigest()[:16]


def check_recorded(path: Path, want: dict[str, Any]) -> None:
    """The file has the recorded size and end hashes (and, for a .npy, the recorded shape and dtype)."""
    if not path.is_file():
        raise UserError(f"{path} is missing: {DAMAGED}")
    size = path.stat().st_size
    if "bytes" in want and size != int(want["bytes"]):
        raise DamagedIndex(path, f"is {size} bytes, index.json recorded {int(want['bytes'])}")
    if want.get("head") not in (None, _digest(path, 0)) or want.get("tail") not in (
        None,
        _digest(path, max(0, size - HASH_SPAN)),
    ):
        raise DamagedIndex(path, "is not the file index.json recorded (its first or last KiB changed)")
    if "shape" in want:
        shape, dtype, _ = npy_header(path)
        if list(shape) != list(want["shape"]) or dtype.str != want.get("dtype", dtype.str):
            raise DamagedIndex(
                path, f"holds {list(shape)} {dtype.str}, index.json recorded {want['shape']} {want.get('dtype')}"
            )


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """A .npy file's shape, dtype and where its data starts, from its header alone."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return tuple(shape), dtype, f.tell()
    except (ValueError, EOFError) as exc:
        raise DamagedIndex(path, f"has no readable .npy header ({exc})") from None


def check_npy(path: Path, n_rows: int, dim: int) -> None:
    """The header is readable, says n_rows x dim, and the file is as long as that shape needs."""
    shape, dtype, offset = npy_header(path)
    need = offset + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise DamagedIndex(path, f"is {size} bytes, its header ({list(shape)} {dtype.str}) needs {need}")
    if n_rows and tuple(shape) != (n_rows, dim):
        raise DamagedIndex(path, f"holds {list(shape)} vectors, index.json says {[n_rows, dim]}")


def check_sqlite(path: Path) -> None:
    """An SQLite file whose size is what its header says (page size x page count, when the count is valid)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SQLITE_HEADER)
    if len(head) < SQLITE_HEADER or not head.startswith(SQLITE_MAGIC):
        raise DamagedIndex(path, f"is not an SQLite database ({size} bytes)")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    count_valid = head[24:28] == head[92:96]  # the change counter matches the version-valid-for number
    if count_valid and pages and size < page_size * pages:
        raise DamagedIndex(path, f"is {size} bytes, its header says {page_size * pages}")


def check_mapped_lists(index: faiss.Index, index_path: Path) -> None:
    """Inverted lists read through a memory map (on-disk lists.ivfdata, or a memory-mapped index.faiss) end
    inside their file. Every layout clip-hpc writes has lists in order, so the last list's end is the file's."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None and ivf.invlists is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists) or lists.nlist == 0:
        return
    path = Path(lists.filename) if lists.filename else index_path
    need = int(lists.totsize) if lists.filename else 0
    for list_no in range(lists.nlist - 1, -1, -1):  # the last non-empty list: usually the very last one
        last = lists.lists.at(list_no)  # a SWIG vector
        if last.capacity:
            need = max(need, int(last.offset) + int(last.capacity) * (int(lists.code_size) + 8))
            break
    size = path.stat().st_size if path.is_file() else 0
    if size < need:
        raise DamagedIndex(path, f"is {size} bytes, the index's inverted lists need {need}")
