"""The one exception type the CLI turns into a one-line error; anything else escaping is a bug."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """Bad input or environment, explained in one line that says what to do."""


def os_error_message(exc: OSError) -> str:
    """An OSError (full disk, read-only mount, permission) as one line a user can act on."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    hint = "; free space and re-run (finished units are kept)" if exc.errno == 28 else ""  # ENOSPC
    return f"{what}{where}{hint}"


@contextmanager
def full_disk_is_a_user_error(out: str | os.PathLike, rerun: str) -> Iterator[None]:
    """A full disk (or quota) while writing `out` as one UserError: the callers remove what they wrote, so it says
    so, and names `out` rather than a temporary file that is gone by the time the message is read."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        what = f" ({os.path.basename(exc.filename)})" if exc.filename else ""
        raise UserError(
            f"{os.strerror(exc.errno)} writing {out}{what}; nothing was left behind: free space and re-run {rerun}"
        ) from None
