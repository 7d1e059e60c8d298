"""The one exception type the CLI turns into a one-line error; anything else escaping is a bug."""


class UserError(ValueError):
    """Bad input or environment, explained in one line that says what to do."""
