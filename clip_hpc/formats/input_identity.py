"""An input's identity, recorded when it is embedded (the shards' `identities`, meta.sqlite's `identity`) and checked
before the server sends its bytes: a replaced object or a rewritten tar member is refused, never served as the
indexed image.

Two kinds, as text: `b2:<hex>`, a BLAKE2b digest of the bytes embedded (objects and tar members: embed holds their
bytes anyway), and `st:<size>:<mtime_ns>` for a local loose file, which embed decodes from its path (stat'ed as the
thumbnail cache does; a copy that keeps size and mtime passes). "" (a shard from before identities) checks nothing.
Standard library only: the server imports it.
"""

from __future__ import annotations

import hashlib
import os

CONTENT, STAT = "b2:", "st:"


class ChangedInputError(OSError):
    """The bytes found are not the bytes that were embedded: the input was replaced after indexing."""


def content_identity(data: bytes) -> str:
    """Pure: the identity of bytes held in memory (an object, a tar member)."""
    return CONTENT + hashlib.blake2b(data, digest_size=16).hexdigest()


def stat_identity(st: os.stat_result) -> str:
    """Pure: the identity of a local file by its size and modification time."""
    return f"{STAT}{st.st_size}:{st.st_mtime_ns}"


def check_content(recorded: str | None, data: bytes, what: str) -> bytes:
    """`data` when it is what was embedded (or nothing was recorded for it); ChangedInputError otherwise."""
    if recorded and recorded.startswith(CONTENT) and content_identity(data) != recorded:
        raise ChangedInputError(
            f"{what} changed after it was indexed (its bytes differ); re-run clip-hpc embed and index"
        )
    return data


def check_stat(recorded: str | None, st: os.stat_result, what: str) -> None:
    """Nothing when the file is the one embedded by size and mtime (or nothing was recorded); ChangedInputError."""
    if recorded and recorded.startswith(STAT) and stat_identity(st) != recorded:
        raise ChangedInputError(
            f"{what} changed after it was indexed (size or modification time differ); re-run clip-hpc embed and index"
        )
