"""`open_index`: an INDEX_DIR searched in this process, with the engine `clip-hpc search` and the server use, so a
notebook gets the ids and scores the CLI and POST /api/search give for the same query."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clip_hpc.api.query import SearchQuery, export_items, plan_query
from clip_hpc.api.results import THUMB_PX, Hit, Results, SearchFilters, jpeg_thumbnail
from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import temp_path
from clip_hpc.search.engine import SearchEngine, UnknownIdError
from clip_hpc.server.image_source import ImageSource, locate

if TYPE_CHECKING:
    from PIL import Image


class Index:
    """An INDEX_DIR open for searching (`clip_hpc.open_index`); close it, or use it as a context manager."""

    def __init__(self, index_dir: str | os.PathLike[str], device: str = "auto", nprobe: int | None = None) -> None:
        self.engine = SearchEngine(Path(index_dir), device=device, nprobe=nprobe)
        self.path = Path(index_dir)

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.engine.n

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, {self.engine.n} images, {self.engine.dim}-d, model {self.engine.info.model})"

    def close(self) -> None:
        """Release the index's files (local) or the HTTP connections (remote)."""
        self.engine.close()

    def search(
        self,
        text: str | None = None,
        image: int | str | os.PathLike[str] | bytes | Image.Image | None = None,
        vector: Sequence[float] | None = None,
        k: int = 10,
        weights: dict[str, float] | None = None,
        negatives: Sequence[int | str] | None = None,
        filters: SearchFilters | None = None,
        diversity: float = 0.0,
        min_score: float | None = None,
    ) -> Results:
        """Search by any mix of `text`, `image` (an id in the index, a path, bytes or a PIL image) and `vector`, as
        POST /api/search does: `weights` per part, `negatives` (ids and/or texts) subtracted, `filters`
        (path_prefix, caption, min_similarity), MMR `diversity` in [0, 1], and a `min_score` floor."""
        query = plan_query(text, image, vector, k, weights, negatives, filters, diversity, min_score)
        hits = self.engine.search_combined(
            self._query_vector(query),
            query.k,
            min_score=query.min_score,
            diversity=query.diversity,
            **query.filters,
        )
        return Results([Hit(h.id, h.score, h.path, h.caption) for h in hits], self.thumbnail)

    def _query_vector(self, query: SearchQuery) -> np.ndarray:
        engine = self.engine
        vector = query.vector
        if query.negative_texts:  # each text's unit vector, as the server's query_vector for that text alone
            texts = engine.encoder.encode_text(query.negative_texts).astype(np.float64)
            vector = (texts / np.linalg.norm(texts, axis=1, keepdims=True)).mean(axis=0).tolist()
        return engine.query_vector(
            text=query.text,
            image_ids=[query.image_id] if query.image_id is not None else [],
            images=[engine.query_image(query.image)] if query.image is not None else [],
            vector=vector,
            negative_ids=query.negative_ids,
            weights=query.weights_with_negative_texts(),
        )

    def image_bytes(self, id: int) -> bytes:
        """The image's bytes as stored (a file, or a tar member read by its offset)."""
        return self._read(id, self._source(id))

    @staticmethod
    def _read(id: int, source: ImageSource) -> bytes:
        """The bytes, checked against what was embedded (a replaced file or object is an error, never other bytes)."""
        try:
            return source.read_bytes()
        except OSError as exc:
            raise UserError(f"image {id} cannot be read ({exc.strerror or exc})") from None

    def image(self, id: int) -> Image.Image:
        """The image as a PIL image (decoded now, not lazily)."""
        from PIL import Image

        with Image.open(io.BytesIO(self.image_bytes(id))) as image:
            image.load()
            return image

    def thumbnail(self, id: int, size: int = THUMB_PX) -> bytes:
        """A JPEG of the image whose longest side is at most `size`."""
        return jpeg_thumbnail(self.image_bytes(id), size)

    def export(
        self, ids: Sequence[int], path: str | os.PathLike[str], scores: Sequence[float | None] | None = None
    ) -> Path:
        """The images and metadata.json as one ZIP at `path` (what POST /api/export sends), written under a
        temporary name and renamed. `ids` may be a `Results`: its scores go along."""
        ids, scores = export_items(ids, scores)
        from starlette.exceptions import HTTPException

        from clip_hpc.server.export import build_zip

        try:
            built = build_zip([(i, self._source(i), s) for i, s in zip(ids, scores)], self._read)
        except HTTPException as exc:
            raise UserError(str(exc.detail)) from None
        out = Path(path)
        tmp = temp_path(out)
        try:
            shutil.move(built, tmp)
            os.replace(tmp, out)
        finally:
            Path(built).unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        return out

    def _source(self, id: int) -> ImageSource:
        source = locate(self.engine.record(int(id)))
        if source is None:
            raise UnknownIdError(f"unknown image id {id}")
        return source


def open_index(index_dir: str | os.PathLike[str], device: str = "auto", nprobe: int | None = None) -> Index:
    """Open an INDEX_DIR (from `clip-hpc index`) for searching in this process; the model loads on first use."""
    return Index(index_dir, device=device, nprobe=nprobe)
