"""inputs.txt's encoding: one input name a line, escaped only where a name could not otherwise survive a line.

Pure functions, bytes in and out; `EmbDir` (emb_dir.py) owns where the file lives and writes it atomically.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# inputs.txt holds one name a line, as is, unless a name needs escaping: then this first line, and every line has
# `\\`, line breaks (everything str.splitlines splits on), other controls and undecodable (surrogate-escaped)
# bytes written as \\xHH or \\uHHHH. Files without the header (all older ones) are read line by line, as is.
ESCAPED_INPUTS_HEADER = "#clip-hpc-inputs escaped v2"
_NEEDS_ESCAPE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


def _escape(name: str) -> str:
    return _NEEDS_ESCAPE.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
        name.replace("\\", "\\\\"),
    )


def _unescape(line: str) -> str:
    return _ESCAPED.sub(lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)), line)


def encode_inputs(names: Sequence[str]) -> bytes:
    """Pure: the bytes of inputs.txt for `names`; plain (as before) when no name needs escaping, so the same
    inputs always give the same bytes (and sha256)."""
    if not any(_NEEDS_ESCAPE.search(name) for name in names) and names[:1] != [ESCAPED_INPUTS_HEADER]:
        return ("\n".join(names) + "\n").encode()
    return ("\n".join([ESCAPED_INPUTS_HEADER, *map(_escape, names)]) + "\n").encode()


def decode_inputs(data: bytes) -> list[str]:
    """Pure: inverse of `encode_inputs`, also for files written before the escaped form (split on \\n only)."""
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if lines and lines[0] == ESCAPED_INPUTS_HEADER:
        return [_unescape(line) for line in lines[1:]]
    return lines
