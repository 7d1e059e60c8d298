"""Building an INDEX_DIR beside the old one and swapping it in whole, and cleaning up after builds that were killed.

Leftovers are named `.OUT.tmp-PID` (a build) and `.OUT.old-PID` (the previous index, moved aside), each with its
owner's host and process start (`OWNER_FILE`), so only a build that is certainly dead is touched.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import socket
from pathlib import Path

from clip_hpc.formats.atomic import hidden_sibling
from clip_hpc.procs import process_start, same_process_alive

OWNER_FILE = ".building-host"  # a temporary build directory names the node its pid lives on, and when it started


def _beside(out: Path, kind: str, pid: int) -> Path:
    """`.OUT.KIND-PID`: what `recover_interrupted` globs for (`.OUT.*-*`)."""
    return hidden_sibling(out, f"{kind}-{pid}")


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two paths atomically (Linux >= 3.15, local filesystems);
    False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    except (OSError, AttributeError):
        return False


def _owner(path: Path) -> tuple[str, str | None]:
    """(host, start time) of a build directory's owner; older records hold only the host."""
    lines = path.read_text().splitlines() + ["", ""]
    return lines[0].strip(), lines[1].strip() or None


def recover_interrupted(out: str | os.PathLike) -> list[Path]:
    """Clean up after builds of `out` that were killed: `.OUT.tmp-PID/` of a dead pid on this node is removed (it
    never was an index); `.OUT.old-PID/` is the previous index, put back if `out` is missing, else removed.
    Returns what it touched."""
    out = Path(out)
    touched = []
    for leftover in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, pid = leftover.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        owner = leftover / OWNER_FILE
        host, start = _owner(owner) if owner.is_file() else (socket.gethostname(), None)
        if host != socket.gethostname() or same_process_alive(int(pid), start):
            continue  # a build that may still be running (here, or on another node)
        if kind == "old" and not out.exists():
            os.replace(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
        touched.append(leftover)
    return touched


def new_build_dir(out: Path) -> Path:
    """An empty `.OUT.tmp-PID/` beside `out`, recording its owner, after `recover_interrupted` cleaned up."""
    recover_interrupted(out)
    tmp = _beside(out, "tmp", os.getpid())
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / OWNER_FILE).write_text(f"{socket.gethostname()}\n{process_start(os.getpid()) or ''}\n")
    return tmp


def put_in_place(new: Path, out: Path) -> None:
    """Put the finished directory `new` in place of `out`: one atomic exchange where the filesystem supports it
    (there is never a moment without an INDEX_DIR), else old aside + rename (`recover_interrupted` puts the
    old one back if a kill lands in between)."""
    (new / OWNER_FILE).unlink(missing_ok=True)
    if out.exists() and _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now holds the old index
        return
    old = _beside(out, "old", os.getpid())
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
