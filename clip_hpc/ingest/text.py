"""Any bytes of a caption or json sidecar -> text that every store accepts (UTF-8, no NUL, no lone surrogate).

Web-scale captions come in every encoding and with every defect; a caption is never worth a failed unit, so each
repair is made and named (a note stored in the image's meta) instead of raised.
"""

from __future__ import annotations

import codecs
import os
import re

MAX_CAPTION_CHARS = 4096  # longer captions are cut here (CLIP reads 77 tokens), with a note in the meta
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_SURROGATES = re.compile("[\ud800-\udfff]")  # what Python makes of argv bytes that are not UTF-8
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")  # breaks or reorders
_UNSTORABLE = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\ud800-\udfff]")


def decode_text(data: bytes, *, cut: bool = False) -> tuple[str, list[str]]:
    """UTF-8, or the encoding a BOM names, or else cp1252/latin-1 (what non-UTF-8 web text mostly is); `cut` says
    `data` is a prefix, so a character split at its end is dropped rather than reported."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            text = data.decode(codec, errors="replace")
            return text, ([] if "\ufffd" not in text else [f"invalid {codec} replaced"])
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        if cut and exc.start >= len(data) - 3:
            return data[: exc.start].decode("utf-8"), []
    try:
        return data.decode("cp1252"), ["not UTF-8: read as cp1252"]
    except UnicodeDecodeError:
        return data.decode("latin-1"), ["not UTF-8: read as latin-1"]


def clean_text(text: str, limit: int = MAX_CAPTION_CHARS, what: str = "caption") -> tuple[str, list[str]]:
    """NUL and other control characters dropped, lone surrogates replaced, cut at `limit` characters; notes say
    what was done."""
    notes = []
    if _UNSTORABLE.search(text):
        text = _UNSTORABLE.sub(lambda m: "\ufffd" if m.group() >= "\ud800" else "", text)
        notes.append(f"{what}: control characters or lone surrogates removed")
    if len(text) > limit:
        notes.append(f"{what}: truncated from {len(text)} to {limit} characters")
        text = text[:limit]
    return text.strip(), notes


def argv_text(text: str) -> str:
    """A command-line argument as text. Python hands argv bytes that are not UTF-8 over as lone surrogates
    (surrogateescape), which no URL, JSON body or tokenizer takes; they are read back the way captions are (a
    Latin-1 terminal's `caf\\xe9` is `café`)."""
    if not _SURROGATES.search(text):
        return text
    return decode_text(os.fsencode(text))[0]


def one_line(text: str) -> str:
    """`text` for a line of terminal output: control characters, line and paragraph separators and bidi overrides
    (which captions and names may hold) written as escapes, so one item stays one line and reads left to right;
    other text, RTL scripts and emoji included, is left as it is."""
    return _LINE_BREAKING.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
