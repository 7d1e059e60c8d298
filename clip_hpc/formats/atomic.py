"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Plain standard library, so laptop-side commands (check-ports, the connection file) can use it without h5py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from clip_hpc.procs import pid_alive

TEMP_MARK = ".tmp."
FOREIGN_TEMP_AGE_S = 3600.0  # another node's writer cannot be asked if it lives; one this quiet is long gone


def hidden_sibling(path: str | os.PathLike[str], suffix: str) -> Path:
    """`.NAME.SUFFIX` beside `path`: THE naming of every temporary or set-aside file and directory here (shard
    temp files, an export or index being built, an old index moved aside), so `.NAME.*` finds them all."""
    path = Path(path)
    return path.with_name(f".{path.name}.{suffix}")


def temp_path(path: str | os.PathLike[str], pid: int | None = None, host: str | None = None) -> Path:
    """The temporary name `atomic_write_bytes` writes `path` under: `.NAME.tmp.HOST.PID`. The host is in the name
    because EMB_DIR sits on a file system shared by nodes, where a pid means something only on its own node."""
    owner = f"{host or socket.gethostname()}.{os.getpid() if pid is None else pid}"
    return hidden_sibling(path, f"tmp.{owner}")  # TEMP_MARK: what `temp_writer_gone` parses


def temp_writer_gone(tmp: Path, now: float | None = None) -> bool:
    """Whether the writer of temporary file `tmp` is certainly dead, so the file may be removed: its pid is gone
    from this node (names without a host, from before it was recorded, count as this node's), or it is another
    node's file untouched for `FOREIGN_TEMP_AGE_S` (an mtime in the future, a clock gone backwards, keeps it)."""
    owner = tmp.name.rpartition(TEMP_MARK)[2]
    host, _, pid = owner.rpartition(".")
    if not pid.isdigit():
        return False
    if host in ("", socket.gethostname()):
        return int(pid) != os.getpid() and not pid_alive(int(pid))
    try:
        return (time.time() if now is None else now) - tmp.stat().st_mtime > FOREIGN_TEMP_AGE_S
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file streamed into place: written under its temporary name, fsync'd, renamed when the block ends; removed
    if the block raises, so a reader never takes half a file (a tar, a shard) for a whole one."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write to a temporary name in the same directory, fsync, rename: readers never see half a file."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
