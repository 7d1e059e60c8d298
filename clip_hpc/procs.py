"""Processes, standard library only (the laptop side and formats/ use it too): is a pid alive, and tie a child to
its parent so that no command we start can outlive us."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (field 3 on: state, ppid, ...), which may itself hold spaces
    and parentheses, hence the split at the last ')'; None where unreadable (no such process, no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields or None


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts as gone)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] != "Z"


def process_start(pid: int) -> str | None:
    """When the process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None where unknown. With the
    pid it names one process for good: a pid is soon reused (pid_max is often 32768, and threads take pids too)."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def process_started_at(pid: int) -> float | None:
    """When the process `pid` started, in seconds since the epoch (boot time + its start tick); None where unknown.
    For records that hold only a wall-clock time rather than `process_start` (connection files from before it)."""
    start = process_start(pid)
    try:
        btime = next(
            line.split()[1] for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return int(btime) + int(start) / os.sysconf("SC_CLK_TCK") if start is not None else None
    except (OSError, StopIteration, ValueError):
        return None


def same_process_alive(pid: int, start: str | None) -> bool:
    """Whether the process that had `pid` when it recorded `start` (`process_start`) still runs; without a recorded
    start (an older record, or no /proc), whether any process has that pid."""
    if not pid_alive(pid):
        return False
    return start is None or process_start(pid) in (None, start)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child (a preexec_fn): the kernel sends `sig` when the parent dies, however it dies (kill -9 too).
    Linux only; elsewhere a no-op (signal forwarding still covers a clean parent exit)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
