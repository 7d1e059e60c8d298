"""The records every search returns, local or remote: `Hit` and `Results` (a sequence of hits that draws itself in
Jupyter as a grid of thumbnails). Standard library only, plus PIL when a grid needs a local thumbnail."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypedDict, overload

if TYPE_CHECKING:
    import pandas

THUMB_PX = 160  # the longest side of a grid thumbnail
GRID_LIMIT = 200  # thumbnails drawn inline at most: a notebook cell is no place for 10,000 data: URIs

Thumbnailer = Callable[[int, int], bytes]  # (id, longest side) -> JPEG bytes


class SearchFilters(TypedDict, total=False):
    """The filters of a search, as POST /api/search's `filters`: rows matching all of those given."""

    path_prefix: str
    caption: str  # full text: captions holding every word
    min_similarity: float  # the stored image-caption cosine (embed --captions)


@dataclass(frozen=True)
class Hit:
    """One result: the image's id in the index, its score (cosine with the query; None for an unranked hit), its
    path, caption ("" if none), and `url`: where a server serves its bytes ("" for a local index)."""

    id: int
    score: float | None
    path: str
    caption: str = ""
    url: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Results(Sequence[Hit]):
    """The hits of one search, best first. Indexes and iterates like a list; `to_pandas()` makes a DataFrame, and
    Jupyter shows it as a grid of thumbnails (`_repr_html_`)."""

    def __init__(self, hits: Sequence[Hit], thumbnail: Thumbnailer | None = None) -> None:
        self.hits: list[Hit] = list(hits)
        self._thumbnail = thumbnail

    @overload
    def __getitem__(self, i: int) -> Hit: ...

    @overload
    def __getitem__(self, i: slice) -> Results: ...

    def __getitem__(self, i: int | slice) -> Hit | Results:
        if isinstance(i, slice):
            return Results(self.hits[i], self._thumbnail)
        return self.hits[i]

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __repr__(self) -> str:
        head = ", ".join(f"{h.id}:{h.score:.3f}" if h.score is not None else str(h.id) for h in self.hits[:5])
        return f"Results({len(self.hits)} hits: {head}{', ...' if len(self.hits) > 5 else ''})"

    @property
    def ids(self) -> list[int]:
        """The hits' ids, best first (what `export` and a `negatives` list take)."""
        return [h.id for h in self.hits]

    @property
    def scores(self) -> list[float | None]:
        """The hits' scores, parallel to `ids`."""
        return [h.score for h in self.hits]

    def to_pandas(self) -> pandas.DataFrame:
        """One row per hit (id, score, path, caption, url); pandas is imported only here."""
        import pandas

        return pandas.DataFrame([h.to_dict() for h in self.hits], columns=["id", "score", "path", "caption", "url"])

    def _repr_html_(self) -> str:
        return results_html(self.hits[:GRID_LIMIT], self._thumbnail, more=max(0, len(self.hits) - GRID_LIMIT))


def results_html(hits: Sequence[Hit], thumbnail: Thumbnailer | None, more: int = 0) -> str:
    """A self-contained grid: each hit a figure with its thumbnail (a data: URI), score and caption, all escaped."""
    cells = "".join(_figure(hit, thumbnail) for hit in hits)
    tail = f'<p class="clip-hpc-more">... and {more} more</p>' if more else ""
    style = (
        "display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px;"
        "font:12px sans-serif;max-width:100%"
    )
    return f'<div class="clip-hpc-results" style="{style}">{cells}</div>{tail}' if hits else "<p>no results</p>"


def _figure(hit: Hit, thumbnail: Thumbnailer | None) -> str:
    score = "" if hit.score is None else f"{hit.score:.4f}"
    caption = html.escape(hit.caption or hit.path.rsplit("/", 1)[-1])
    return (
        f'<figure class="clip-hpc-hit" data-id="{hit.id}" style="margin:0;text-align:center">'
        f"{_img(hit, thumbnail)}"
        f'<figcaption><b class="score">{score}</b> <span title="{html.escape(hit.path)}">{caption}</span>'
        f"</figcaption></figure>"
    )


def _img(hit: Hit, thumbnail: Thumbnailer | None) -> str:
    """The thumbnail inline, or a placeholder saying why not (the grid still shows the scores)."""
    box = f"width:{THUMB_PX}px;height:{THUMB_PX}px;object-fit:contain;background:#eee"
    if thumbnail is None:
        return f'<div style="{box}"></div>'
    try:
        data = thumbnail(hit.id, THUMB_PX)
    except Exception as exc:  # one unreadable image must not hide the other results
        return f'<div style="{box}" title="{html.escape(str(exc))}">unavailable</div>'
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{uri}" alt="{hit.id}" style="{box}">'


def jpeg_thumbnail(data: bytes, size: int = THUMB_PX) -> bytes:
    """Image bytes -> a JPEG whose longest side is at most `size` (PIL is imported only here)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # a JPEG decodes at a fraction of its size: fast for big photos
        small = image.convert("RGB")
        small.thumbnail((size, size))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=85)
    return out.getvalue()
