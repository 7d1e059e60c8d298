"""The many-rank side of `clip-hpc index`: who adds which units, shipping the trained index, and merging the lists
(the steps themselves run under cluster/collective.py, so an error on any rank reaches every rank).

Rank 0 trains and broadcasts the trained, empty index; every rank adds its own units (u % W == r, as in embed) and
writes its lists; rank 0 merges them, in memory when they are small, else into one on-disk `lists.ivfdata`
(FAISS OnDiskInvertedLists) that the server memory-maps. The merge writes that file with ordinary writes, not
FAISS's own merge: that one writes through a memory map, and a full disk is then a SIGBUS instead of an OSError.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clip_hpc.cluster.world import World
from clip_hpc.errors import UserError

LISTS_MODES = ("auto", "memory", "disk")
MEMORY_MERGE_LIMIT = 4 << 30  # bytes of codes and ids: above this the merge goes to disk


def my_units(units: Sequence[int], world: World) -> list[int]:
    """This rank's share of the units: the same round robin as `clip-hpc embed`."""
    return [u for u in units if u % world.size == world.rank]


def serialize(index: faiss.Index) -> np.ndarray:
    return faiss.serialize_index(index)


def deserialize(blob: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(blob)


def lists_bytes(index: faiss.Index) -> int:
    """What the merged inverted lists take: codes plus 8-byte ids per vector."""
    ivf = faiss.extract_index_ivf(index)
    return int(index.ntotal) * (int(ivf.code_size) + 8)


def choose_lists(mode: str, expected_bytes: int) -> str:
    """'memory' or 'disk' for the merged lists; 'auto' goes to disk above MEMORY_MERGE_LIMIT."""
    if mode not in LISTS_MODES:
        raise UserError(f"--lists must be one of {', '.join(LISTS_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode
    return "disk" if expected_bytes > MEMORY_MERGE_LIMIT else "memory"


def merge_in_memory(own: faiss.Index, parts: Sequence[Path]) -> faiss.Index:
    """Rank 0's index with the other ranks' lists appended, list by list (ids are global already)."""
    target = faiss.extract_index_ivf(own)
    for path in parts:
        other = faiss.read_index(str(path))  # read whole: merge_from empties the source lists it took
        target.merge_from(faiss.extract_index_ivf(other), 0)
        own.ntotal = target.ntotal
    return own


def merge_on_disk(trained: faiss.Index, parts: Sequence[Path], ivfdata: Path) -> faiss.Index:
    """Every rank's lists into one OnDiskInvertedLists file, `trained` (empty) pointing at it."""
    sources = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in parts]  # mapped, not read: may exceed RAM
    return write_ondisk_lists(trained, [faiss.extract_index_ivf(s).invlists for s in sources], ivfdata)


def lists_to_disk(index: faiss.Index, ivfdata: Path) -> faiss.Index:
    """An index's in-memory lists moved into `ivfdata` (`index --update` of an index with on-disk lists)."""
    return write_ondisk_lists(index, [faiss.extract_index_ivf(index).invlists], ivfdata)


def write_ondisk_lists(target: faiss.Index, sources: Sequence[Any], ivfdata: Path) -> faiss.Index:
    """The `sources` lists, list by list, appended into `ivfdata` in FAISS's compact on-disk layout (per list its
    codes, then its ids) with ordinary writes; then `target` serves them from that file, memory-mapped."""
    from faiss.contrib.inspect_tools import get_invlist

    ivf = faiss.extract_index_ivf(target)
    sizes = np.zeros(ivf.nlist, dtype=np.uint64)
    try:
        with open(ivfdata, "wb") as f:
            for list_no in range(ivf.nlist):
                ids, codes = zip(*(get_invlist(lists, list_no) for lists in sources))
                f.write(np.concatenate(codes).tobytes())
                f.write(np.concatenate(ids).astype(np.int64).tobytes())
                sizes[list_no] = sum(map(len, ids))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a full disk: name the file, as open() would have
        raise OSError(exc.errno, exc.strerror, str(ivfdata)) from None
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    ondisk.set_all_lists_sizes(faiss.swig_ptr(sizes))
    ondisk.totsize = int(sizes.sum()) * (int(ivf.code_size) + 8)
    ondisk.do_mmap()
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()
    target.ntotal = ivf.ntotal = int(sizes.sum())
    return target
