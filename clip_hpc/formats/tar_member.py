"""The input line of a tar member, `TARPATH::MEMBER` (inputs.txt, the shards' `paths`, meta.sqlite's `path`), owned
here: the ingest side writes it, the server splits it back to find the file on disk.

The separator can also occur in a directory name (`d::x/00000.tar::a.jpg`) or a member name (`a.tar::b::c.jpg`),
so a line is split at the first `::` whose left side ends in `.tar` and names an existing file, not at the first
`::`. Standard library only: the laptop side and the server's file checks import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

SEPARATOR = "::"
REFUSED = " (refused name)"  # appended to a loose input whose name reads as a member line (`loose_line`)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # compressed ones only to say they cannot be read (ingest/tars.py)


def is_tar_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def member_line(tar: str, member: str) -> str:
    """The input line of `member` inside the tar at `tar`."""
    return f"{tar}{SEPARATOR}{member}"


def loose_line(path: str, is_file: Callable[[str], bool] = os.path.isfile) -> str:
    """The input line of a loose file or object: its path, unless `split_member_line` would read it as a member of
    a tar that `is_file` (`t.tar::m.jpg` beside `t.tar`): then a line of its own that no member has (members end in
    an image suffix), which embed records as a failure (`refusal`). A line's syntax never makes two inputs one; a
    folder merely named `d::x.tar::y/` beside no such tar keeps its files."""
    return path + REFUSED if any(is_file(path[:at]) for at in _candidates(path)) else path


def refusal(line: str) -> str | None:
    """Why a line from `loose_line` is not embedded; None for any other line."""
    if not (line.endswith(REFUSED) and _candidates(line.removesuffix(REFUSED))):
        return None
    return (
        f"its name holds '{SEPARATOR}' after '.tar', so it would read as a tar member's line "
        "(TARPATH::MEMBER); rename it"
    )


def _candidates(line: str) -> list[int]:
    """Offsets of every `::` whose left side could be a tar path (ends in `.tar`), left to right."""
    found, at = [], line.find(SEPARATOR)
    while at >= 0:
        if is_tar_path(line[:at]):
            found.append(at)
        at = line.find(SEPARATOR, at + 1)
    return found


def split_member_line(line: str, is_file: Callable[[str], bool] = os.path.isfile) -> tuple[str, str] | None:
    """`TARPATH::MEMBER` -> (tar path, member name); None for a loose file.

    Among the `::` that follow a `.tar`, the first whose left side `is_file` wins (a directory `x.tar::y/` is no
    file, so its tar further right wins; a member named `b::c.jpg` keeps its `::`). When no candidate tar exists
    (moved, deleted), the line is a loose file if it exists itself, else split at the last candidate: that tar's
    directory is the deepest a wrong guess can give, so the served root never widens because of it."""
    candidates = _candidates(line)
    if not candidates:
        return None
    at = next((at for at in candidates if is_file(line[:at])), None)
    if at is None:
        if is_file(line):
            return None
        at = candidates[-1]
    return line[:at], line[at + len(SEPARATOR) :]


def file_on_disk(line: str) -> str:
    """The file that holds an input line's bytes: the tar for a member, else the line itself."""
    split = split_member_line(line)
    return line if split is None else split[0]
