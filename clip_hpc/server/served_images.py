"""`ServedImages`: the one way the HTTP routes reach an indexed image's bytes (the image route, thumbnails and the
ZIP export): the id is looked up in the index, never a path taken from the request, and thumbnails are cached."""

from __future__ import annotations

import io
import threading
from dataclasses import replace
from functools import lru_cache

from starlette.exceptions import HTTPException

from clip_hpc.formats.input_identity import ChangedInputError
from clip_hpc.ingest.images import DecodeFailure, decode_image
from clip_hpc.search.engine import SearchEngine
from clip_hpc.server.files import Servable, ServableObject, servable_file, servable_object, served_root
from clip_hpc.server.image_source import ImageSource, locate


def changed(image_id: int, exc: ChangedInputError) -> HTTPException:
    """409 naming the image: its input is no longer what was embedded, and other bytes are never sent for it."""
    return HTTPException(409, f"image {image_id}: {exc}")


class ServedImages:
    """Source lookup and a thumbnail cache of `thumb_cache_size` entries; full-size decodes share `decode_slots`
    with the search routes' uploads (a decode can take hundreds of MB)."""

    def __init__(self, engine: SearchEngine, decode_slots: threading.BoundedSemaphore, thumb_cache_size: int) -> None:
        self.engine, self.decode_slots = engine, decode_slots
        self.root = served_root(engine.meta)
        self._cached_thumbnail = lru_cache(maxsize=thumb_cache_size)(self._render_thumbnail)

    def source_of(self, image_id: int) -> tuple[ImageSource, Servable | ServableObject]:
        """Only images listed in the index are ever served, and only when `servable_file` allows the file that holds
        them (regular, readable, under the indexed tree), or `servable_object` the object (it exists, one HEAD); a
        tar member is then read from that checked file or object by its stored offset."""
        source = locate(self.engine.record(image_id))
        if source is None:
            raise HTTPException(404, f"image {image_id} not found")
        if isinstance(source.path, str):
            found: Servable | ServableObject | str = servable_object(source.path)
        else:
            found = servable_file(str(source.path), self.root)
        if isinstance(found, str):
            raise HTTPException(404, f"image {image_id} {found}")
        source = replace(source, path=found.path)
        if not source.available(getattr(found, "size", None)):
            raise HTTPException(404, f"image {image_id} is in the index but its bytes are gone (a shorter tar?)")
        try:
            source.check(getattr(found, "stat", None))
        except ChangedInputError as exc:
            raise changed(image_id, exc) from None
        return source, found

    def read(self, image_id: int, source: ImageSource) -> bytes:
        try:
            return source.read_bytes()
        except ChangedInputError as exc:
            raise changed(image_id, exc) from None
        except OSError as exc:  # vanished or unreadable since it was judged servable
            raise HTTPException(404, f"image {image_id} cannot be read ({exc.strerror or exc})") from None

    def thumbnail(self, image_id: int, size: int) -> bytes:
        """Cached by the file's identity (inode, size, mtime; an object's ETag or size and last-modified): a replaced
        or deleted file is never served stale."""
        source, found = self.source_of(image_id)
        return self._cached_thumbnail(image_id, source, found.identity, size)

    def thumbnail_cache_hits(self) -> int:
        """How many thumbnails were answered from the cache (for tests and debugging)."""
        return self._cached_thumbnail.cache_info().hits

    def _render_thumbnail(self, image_id: int, source: ImageSource, _identity: tuple, size: int) -> bytes:
        data = source.path if source.member is None and not source.remote else self.read(image_id, source)
        with self.decode_slots:
            image = decode_image(data, min_size=size)
        if isinstance(image, DecodeFailure):
            raise HTTPException(404, f"image {image_id} cannot be decoded: {image}")
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()
