"""One contiguous span of a file read into a reused buffer: from the page cache what it holds, and the rest either
through it (a plain read) or around it (O_DIRECT). A scan over more shards than memory holds gains nothing from
caching them, and the cache's page copies cost CPU time: a cold 2-rank filter on 2 cores spent 1.1-2.0 s of CPU per
1.5 M vectors reading through the cache and 0.1-0.4 s reading around it, time its scorers then had (docs/subsets.md)."""

from __future__ import annotations

import errno
import io
import os

import numpy as np

PAGE = 4096  # O_DIRECT wants file offsets, lengths and memory aligned to the device's block; a page covers them all
CAN_GO_AROUND = all(hasattr(os, name) for name in ("preadv", "RWF_NOWAIT", "O_DIRECT", "posix_fadvise"))  # Linux
PROBE = 1 << 20  # bytes asked of the page cache at a time
_NOT_HERE = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system without RWF_NOWAIT or O_DIRECT


def room_for(nbytes: int) -> int:
    """The bytes a buffer needs to read `nbytes` page-aligned at any file offset: the span rounded out to pages at
    both ends, plus a page to align the start."""
    return nbytes + 3 * PAGE


def scratch(nbytes: int, spare: np.ndarray | None = None) -> np.ndarray:
    """`spare` (1-d uint8, contiguous) when it has `room_for(nbytes)`, else a new array with that room."""
    need = room_for(nbytes)
    fits = (
        spare is not None
        and spare.ndim == 1
        and spare.dtype == np.uint8
        and spare.flags.c_contiguous
        and spare.flags.writeable
        and len(spare) >= need
    )
    return spare if fits else np.empty(need, np.uint8)  # type: ignore[return-value]  # fits implies not None


def read_span(
    path: str | os.PathLike, offset: int, nbytes: int, spare: np.ndarray | None = None, around_cache: bool = False
) -> np.ndarray:
    """Bytes [offset, offset + nbytes) of `path` as uint8, a view into `spare` where it has room (`scratch`), else into
    a new array; fewer only where the file ends first (the caller says what a short read means). `around_cache`:
    what the page cache does not hold is read straight from the disk, and left out of the cache; where the file
    system or the OS (not Linux) cannot do that, through the cache."""
    into = scratch(nbytes, spare)
    start = offset - offset % PAGE
    pad = -into.ctypes.data % PAGE
    window = into[pad : pad + -(-(offset + nbytes - start) // PAGE) * PAGE]  # page-aligned, whole pages
    skip = offset - start
    around = around_cache and CAN_GO_AROUND
    with open(path, "rb", buffering=0) as f:
        if around:  # the cache probe must not start the kernel's read-ahead (8 MB on a virtio disk here)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        done = _cached(f.fileno(), window[skip : skip + nbytes], offset) if around else 0
        if done < nbytes and around:
            done = max(done, _direct(path, window, start, offset + done) - offset)
        if done < nbytes:
            done += _read_all(f, window[skip + done : skip + nbytes], offset + done)
    return window[skip : skip + min(done, nbytes)]


def _read_all(f: io.FileIO, view: np.ndarray, pos: int) -> int:
    """Bytes read into `view` from `pos` until it is full or the file ends (any OS: a plain read)."""
    f.seek(pos)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:].data)
        if not n:
            break
        got += n
    return got


def _cached(fd: int, view: np.ndarray, pos: int) -> int:
    """How much of the span, from its start, the page cache holds, copied into `view`. A read that may not wait
    (RWF_NOWAIT) still starts the disk read of what it missed, as large as it asked (the fd reads at random, so
    no more): so the first asks for a page, the others for PROBE bytes, which is all a miss can cost."""
    got, ask = 0, PAGE
    try:
        while got < len(view):
            asked = min(ask, len(view) - got)
            n = os.preadv(fd, [view[got : got + asked].data], pos + got, os.RWF_NOWAIT)
            got += n
            if n < asked:  # a page the cache lacks, or the end of the file
                break
            ask = PROBE
    except BlockingIOError:  # the next page is not in the cache
        pass
    except OSError as exc:
        if exc.errno not in _NOT_HERE:
            raise
    return got


def _direct(path: str | os.PathLike, window: np.ndarray, start: int, pos: int) -> int:
    """The file position up to which `window` (file bytes from `start`, page-aligned) holds the file once the rest
    from `pos` is read by O_DIRECT, in whole pages from the page below `pos`; `pos` itself where it cannot be."""
    first = pos - pos % PAGE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno in _NOT_HERE:
            return pos
        raise
    got = 0
    try:
        view = window[first - start :]
        while got < len(view):
            n = os.preadv(fd, [view[got:].data], first + got)
            got += n
            if n == 0 or n % PAGE:  # the end of the file
                break
    except OSError as exc:
        if exc.errno not in _NOT_HERE:
            raise
    finally:
        os.close(fd)
    return max(pos, first + got)


def node_memory() -> int:
    """The bytes of memory this process's page cache can use: the machine's, or its cgroup's limit where lower (a
    SLURM job's memory is such a limit)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total
