"""May this file be served? The one answer every route that sends an image's bytes asks for.

An indexed path is only a name: by serving time it may be a symlink to /etc/passwd, a FIFO, or unreadable.
A file is served only if, with symlinks resolved, it is a readable regular file under the directory tree the
index was built from (the common root of its paths), and never from /proc, /sys or /dev.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from clip_hpc.formats.tar_member import file_on_disk
from clip_hpc.ingest.object_store import is_url

NEVER_SERVED = ("/proc", "/sys", "/dev")


class PathBounds(Protocol):
    """What `served_root` needs of a `MetadataStore`."""

    def path_bounds(self, *, local_only: bool = False) -> tuple[str, str] | None: ...


def served_root(meta: PathBounds) -> str | None:
    """`embedded_root` of the index's files on disk: object-store URLs are no directories (an index of objects
    only has no root; each object is served only as the index names it)."""
    bounds = meta.path_bounds()
    if bounds is not None and any(map(is_url, bounds)):
        bounds = meta.path_bounds(local_only=True)
    return embedded_root(bounds)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def embedded_root(bounds: tuple[str, str] | None) -> str | None:
    """The deepest directory holding every indexed file (from the lowest and highest path; a tar member's file is
    its tar), symlinks resolved."""
    if bounds is None:
        return None
    low, high = map(file_on_disk, bounds)
    common = os.path.commonpath([os.path.dirname(low) or "/", os.path.dirname(high) or "/"])
    return os.path.realpath(common)


@dataclass(frozen=True)
class Servable:
    """A file that may be sent: its resolved path and the stat result it was judged by (also its identity)."""

    path: Path
    stat: os.stat_result

    @property
    def identity(self) -> tuple[int, int, int, int]:
        """Changes when the file is replaced or rewritten: a cache keyed by it never serves stale bytes."""
        return (self.stat.st_dev, self.stat.st_ino, self.stat.st_size, self.stat.st_mtime_ns)


def servable_file(path: str, root: str | None) -> Servable | str:
    """The file to send for an indexed `path`, or why not (a short reason for a 404)."""
    real = os.path.realpath(path)
    if any(_within(real, forbidden) for forbidden in NEVER_SERVED):
        return "is not served (a system path)"
    if root is not None and not _within(real, root):
        return "now points outside the indexed directories"
    try:
        st = os.stat(real)
    except OSError:
        return "is in the index but its file is gone"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    os.close(fd)
    return Servable(Path(real), st)


@dataclass(frozen=True)
class ServableObject:
    """An object that may be sent (the S3 form of `Servable`): its URL, size and identity (ETag, or size and
    last-modified) as one HEAD found them."""

    path: str
    size: int
    identity: tuple


def servable_object(url: str) -> ServableObject | str:
    """The object to send for an indexed URL, or why not: it must be an object (not a prefix) and readable now. No
    symlinks or system paths exist in a store, and the URL comes from the index, never from the request."""
    from clip_hpc.ingest.object_store import stat_object

    try:
        found = stat_object(url)
    except FileNotFoundError:
        return "is in the index but its object is gone"
    except (TimeoutError, ConnectionError):  # the store's fault, not the object's: `ServedImages` says 504/502
        raise
    except OSError as exc:
        return f"cannot be read ({str(exc)[:120]})"
    if not found.is_file:
        return "is not an object"
    return ServableObject(url, found.size, found.identity)
