"""What `search(...)` was asked, checked and split the one way both indexes (local and remote) read it.

Standard library only. Negative texts have no slot of their own in the engine or the HTTP API: their mean unit
vector is searched as the `vector` part with the negative weight, subtracted (so a query cannot give both)."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from clip_hpc.api.results import Results, SearchFilters
from clip_hpc.errors import UserError

NEGATIVE_WEIGHT = 0.25  # ann.core.DEFAULT_WEIGHTS["negative"] (not imported: that module loads numpy and FAISS)
FILTER_KEYS = frozenset(SearchFilters.__annotations__)

# An image query: an id in the index, a file path, encoded bytes, or a PIL image.
ImageQuery = Any


@dataclass(frozen=True)
class SearchQuery:
    """One search: `image_id` xor `image` (the other is None), negatives split into ids and texts."""

    text: str | None = None
    image_id: int | None = None
    image: ImageQuery = None
    vector: list[float] | None = None
    k: int = 10
    weights: dict[str, float] = field(default_factory=dict)
    negative_ids: list[int] = field(default_factory=list)
    negative_texts: list[str] = field(default_factory=list)
    filters: SearchFilters = field(default_factory=lambda: SearchFilters())
    diversity: float = 0.0
    min_score: float | None = None

    def weights_with_negative_texts(self) -> dict[str, float]:
        """The weights to send with the negative texts' mean vector as the `vector` part."""
        if not self.negative_texts:
            return dict(self.weights)
        return {**self.weights, "vector": -float(self.weights.get("negative", NEGATIVE_WEIGHT))}


def plan_query(
    text: str | None = None,
    image: ImageQuery = None,
    vector: Sequence[float] | None = None,
    k: int = 10,
    weights: dict[str, float] | None = None,
    negatives: Sequence[int | str] | None = None,
    filters: SearchFilters | None = None,
    diversity: float = 0.0,
    min_score: float | None = None,
) -> SearchQuery:
    """`search`'s arguments -> a `SearchQuery`; what both sides would refuse is refused here, in one line."""
    if text is None and image is None and vector is None:
        raise UserError("empty query: give text, an image (an id, a path, bytes or a PIL image) or a vector")
    if isinstance(image, bool):
        raise UserError("image must be an id, a path, bytes or a PIL image, not a bool")
    if isinstance(image, str | os.PathLike) and not os.path.isfile(image):
        raise UserError(f"image {image} is not a file")
    negative_ids = [int(n) for n in negatives or () if is_id(n)]
    negative_texts = [n for n in negatives or () if isinstance(n, str)]
    if len(negative_ids) + len(negative_texts) != len(negatives or ()):
        raise UserError("negatives must be image ids (int) or texts (str)")
    if negative_texts and vector is not None:
        raise UserError("negative texts are searched as the vector part: give either a vector or negative texts")
    unknown = set(filters or {}) - FILTER_KEYS
    if unknown:
        raise UserError(f"unknown filters {sorted(unknown)}; use {sorted(FILTER_KEYS)}")
    return SearchQuery(
        text=text,
        image_id=int(image) if is_id(image) else None,
        image=None if is_id(image) else image,
        vector=None if vector is None else [float(x) for x in vector],
        k=k,
        weights=dict(weights or {}),
        negative_ids=negative_ids,
        negative_texts=negative_texts,
        filters=cast(SearchFilters, {key: value for key, value in (filters or {}).items() if value is not None}),
        diversity=float(diversity),
        min_score=min_score,
    )


def is_id(value: Any) -> bool:
    """An image id: any integer (numpy's too, as a DataFrame column gives them), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def mean_vector(rows: Sequence[Sequence[float]]) -> list[float]:
    """The element-wise mean of equal-length vectors, in plain Python (the remote side has no numpy)."""
    return [sum(column) / len(rows) for column in zip(*rows)]


def export_items(
    ids: Sequence[int] | Results, scores: Sequence[float | None] | None
) -> tuple[list[int], list[float | None]]:
    """Each id once with its first score, as POST /api/export keeps them; a `Results` brings its own scores."""
    if isinstance(ids, Results):
        scores = ids.scores if scores is None else scores
        ids = ids.ids
    ids = [int(i) for i in ids]
    if not ids:
        raise UserError("no image ids to export")
    scores = list(scores) if scores is not None else [None] * len(ids)
    if len(scores) != len(ids):
        raise UserError(f"scores has {len(scores)} entries but ids has {len(ids)}")
    first: dict[int, float | None] = {}
    for i, s in zip(ids, scores):
        first.setdefault(i, s)
    return list(first), list(first.values())
