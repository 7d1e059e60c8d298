"""formats/span_read.py: a span of a file read into a reused buffer, from the page cache what it holds and (around
the cache) the rest straight from the disk; the same bytes either way, at any offset and length."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clip_hpc.formats.span_read import PAGE, PROBE, node_memory, read_span, room_for, scratch


def a_file(folder: Path, size: int = 5 * PAGE + 123) -> tuple[Path, bytes]:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = folder / "data.bin"
    path.write_bytes(data)
    return path, data


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped until written back
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_share(path: Path) -> float:
    """The share of the file's pages the page cache holds, by mincore on a map of it (a probing read would start
    the kernel's read-ahead)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size, pages = path.stat().st_size, -(-path.stat().st_size // PAGE)
    resident = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), resident) == 0, ctypes.get_errno()
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(b & 1 for b in resident) / pages


def direct_io_here(folder: Path) -> bool:
    try:
        os.close(os.open(a_file(folder, PAGE)[0], os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


SPANS = [
    (0, 0),
    (0, 1),
    (1, 1),
    (7, PAGE),
    (PAGE, PAGE),
    (PAGE - 3, 2 * PAGE + 5),
    (123, 5 * PAGE),
    (0, 5 * PAGE + 123),
]


@pytest.mark.parametrize("around", [False, True])
@pytest.mark.parametrize("cold", [False, True])
def test_every_span_is_the_files_bytes(tmp_path, around, cold):
    path, data = a_file(tmp_path)
    for offset, nbytes in SPANS:
        if cold:
            evict(path)
        got = read_span(path, offset, nbytes, around_cache=around)
        assert got.dtype == np.uint8 and got.tobytes() == data[offset : offset + nbytes], (offset, nbytes)


def test_a_span_past_the_end_comes_back_short(tmp_path):
    path, data = a_file(tmp_path)
    for around in (False, True):
        evict(path)
        got = read_span(path, len(data) - 10, 100, around_cache=around)
        assert got.tobytes() == data[-10:]


def test_around_the_cache_leaves_the_disks_part_out_of_it_and_takes_the_cached_part_from_it(tmp_path):
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    size = 1024 * PAGE
    path, data = a_file(tmp_path, size)
    evict(path)
    assert cached_share(path) == 0
    assert read_span(path, 5, size - 5, around_cache=True).tobytes() == data[5:]
    assert cached_share(path) < 0.01  # from the disk, not kept: the first probe of the cache reads one page
    assert read_span(path, 5, size - 5).tobytes() == data[5:]  # through the cache
    assert cached_share(path) == 1
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: the first 100 pages cached, the rest not
    os.pread(fd, 100 * PAGE, 0)
    os.close(fd)
    assert 0.09 < cached_share(path) < 0.1
    assert read_span(path, 3, size - 3, around_cache=True).tobytes() == data[3:]
    assert cached_share(path) < 0.1 + PROBE / size  # a probe that misses reads at most PROBE bytes


def test_where_the_file_system_has_no_direct_reads_around_the_cache_reads_through_it(tmp_path, monkeypatch):
    """Every file system here takes O_DIRECT (tmpfs too, since Linux 6.6), so one that refuses it, as some
    network and FUSE file systems do, is stood in for by refusing the flag at open."""
    import errno

    path, data = a_file(tmp_path)
    real_open = os.open

    def refusing(file, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    evict(path)
    assert read_span(path, 11, 3 * PAGE, around_cache=True).tobytes() == data[11 : 11 + 3 * PAGE]


def test_a_spare_with_room_is_read_into_and_one_without_is_not(tmp_path):
    path, data = a_file(tmp_path)
    spare = scratch(2 * PAGE)
    assert len(spare) == room_for(2 * PAGE) and scratch(2 * PAGE, spare) is spare
    for around in (False, True):
        got = read_span(path, 1001, 2 * PAGE, spare, around)
        assert np.shares_memory(got, spare) and got.tobytes() == data[1001 : 1001 + 2 * PAGE]
        bigger = read_span(path, 1001, 3 * PAGE, spare, around)
        assert not np.shares_memory(bigger, spare) and bigger.tobytes() == data[1001 : 1001 + 3 * PAGE]
    for wrong in (np.zeros(room_for(2 * PAGE), np.float16), np.zeros((2, room_for(2 * PAGE)), np.uint8)):
        assert scratch(2 * PAGE, wrong) is not wrong


def test_the_memory_a_cache_can_use_is_at_most_the_machines():
    assert 0 < node_memory() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_without_linuxs_calls_every_read_goes_through_the_cache(tmp_path, monkeypatch):
    """macOS has no preadv, RWF_NOWAIT, O_DIRECT nor posix_fadvise: a notebook's filter there reads plainly."""
    import clip_hpc.formats.span_read as span_read

    path, data = a_file(tmp_path, 300 * PAGE)
    evict(path)
    monkeypatch.setattr(span_read, "CAN_GO_AROUND", False)
    for name in ("preadv", "RWF_NOWAIT", "O_DIRECT", "posix_fadvise"):
        monkeypatch.delattr(os, name)  # a call to any of them would fail
    assert read_span(path, 77, 299 * PAGE, around_cache=True).tobytes() == data[77 : 77 + 299 * PAGE]
    monkeypatch.undo()
    assert cached_share(path) == 1
