"""`POST /api/export`: the chosen images and their metadata as one ZIP."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException

from clip_hpc.server.image_source import ImageSource


def entry_name(image_id: int, name: str) -> str:
    """`images/<id>_<name>` with only the name's last part (a tar member may be named `..\\..\\evil.jpg`), and no
    leading dots: no entry an unzip could place outside its folder or hide."""
    last = name.replace("\\", "/").rsplit("/", 1)[-1].lstrip(".")
    return f"images/{image_id}_{last or 'image'}"


def build_zip(items: Sequence[tuple[int, ImageSource, float | None]], read: Callable[[int, ImageSource], bytes]) -> str:
    """`images/<id>_<name>` (`entry_name`) plus `metadata.json` (id, indexed path, score, file), in a temporary file
    the caller deletes. A tar member's or object's bytes come from `read` (`ServedImages.read`: checked against what
    was embedded, HTTP errors for what cannot be sent), a tar member's by offset, exactly as stored in the tar.

    Images are stored, not deflated: they are compressed already, and the ZIP may be large.
    """
    fd, tmp = tempfile.mkstemp(prefix="clip-hpc-export-", suffix=".zip")
    os.close(fd)
    metadata: list[dict[str, Any]] = []
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for image_id, source, score in items:
                name = entry_name(image_id, source.name)
                if source.member is None and not source.remote:
                    try:
                        zf.write(source.path, name)
                    except OSError as exc:  # vanished or unreadable since it was judged servable
                        raise HTTPException(404, f"image {image_id} cannot be read ({exc.strerror or exc})") from None
                else:
                    zf.writestr(name, read(image_id, source))
                metadata.append({"id": image_id, "path": source.indexed_path, "score": score, "file": name})
            zf.writestr("metadata.json", json.dumps(metadata, indent=2), compress_type=zipfile.ZIP_DEFLATED)
    except BaseException:
        os.unlink(tmp)  # no half-written export left in /tmp, whatever went wrong
        raise
    return tmp
