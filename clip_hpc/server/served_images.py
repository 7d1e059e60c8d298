"""`ServedImages`: the one way the HTTP routes reach an indexed image's bytes (the image route, thumbnails and the
ZIP export): the id is looked up in the index, never a path taken from the request, and thumbnails are cached."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache

from starlette.exceptions import HTTPException

from clip_hpc.errors import UserError
from clip_hpc.formats.input_identity import ChangedInputError
from clip_hpc.ingest.images import DecodeFailure, decode_image
from clip_hpc.ingest.object_store import is_url
from clip_hpc.search.engine import SearchEngine
from clip_hpc.server.files import Servable, ServableObject, servable_file, servable_object, served_root
from clip_hpc.server.image_source import ImageSource, locate

STORE_SLOTS = 8  # request threads that may wait on the object store at once (`CLIP_HPC_STORE_SLOTS`)


def store_slots() -> int:
    text = os.environ.get("CLIP_HPC_STORE_SLOTS", "")
    if not text:
        return STORE_SLOTS
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"CLIP_HPC_STORE_SLOTS={text!r}: must be a positive whole number")
    return int(text)


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
        self.n_store_slots = store_slots()
        self._store_slots = threading.BoundedSemaphore(self.n_store_slots)

    @contextmanager
    def _store(self, image_id: int, remote: bool) -> Iterator[None]:
        """At most `n_store_slots` request threads wait on the object store at once (each call bounded in time,
        `object_store.TimeBounds`): a stalled store answers the others 503 at once and a passed deadline 504, so
        it never takes the thread pool that search and /health need."""
        if not remote:
            yield
            return
        if not self._store_slots.acquire(blocking=False):
            raise HTTPException(
                503, f"image {image_id}: {self.n_store_slots} reads from the object store are waiting already"
            )
        try:
            yield
        except TimeoutError as exc:
            raise HTTPException(504, f"image {image_id}: {exc}") from None
        except ConnectionError as exc:  # the store cannot be reached: its fault, not the image's
            raise HTTPException(502, f"image {image_id}: {str(exc)[:200]}") from None
        finally:
            self._store_slots.release()

    def source_of(self, image_id: int) -> tuple[ImageSource, Servable | ServableObject]:
        """Only images listed in the index are ever served, and only when `servable_file` allows the file that holds
        them (regular, readable, under the indexed tree), or `servable_object` the object (it exists, one HEAD); a
        tar member is then read from that checked file or object by its stored offset."""
        record = self.engine.record(image_id)
        with self._store(image_id, record is not None and is_url(str(record["path"]))):
            source = locate(record)
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
        """The image's bytes: 409 if they are not the ones embedded, 404 if they cannot be read, 504 if the object
        store does not answer in time."""
        try:
            with self._store(image_id, source.remote):
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
