"""The one exception type the CLI turns into a one-line error; anything else escaping is a bug."""


class UserError(ValueError):
    """Bad input or environment, explained in one line that says what to do."""


def os_error_message(exc: OSError) -> str:
    """An OSError (full disk, read-only mount, permission) as one line a user can act on."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    hint = "; free space and re-run (finished units are kept)" if exc.errno == 28 else ""  # ENOSPC
    return f"{what}{where}{hint}"
