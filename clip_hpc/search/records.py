"""What a search gives and takes: hits, filters, the id error and the result limit, apart from the engine that
loads an INDEX_DIR, so the server's schemas and the CLI's printing need no FAISS or model import to name them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypedDict

from clip_hpc.errors import UserError

MAX_K = 10_000  # results per query, for the CLI and the HTTP API alike
PREFILTER_LIMIT = (
    50_000  # a filter (path_prefix, caption, min_similarity) matching fewer ids is searched exactly over just those
)


class MetaFilters(TypedDict):
    """The filters meta.sqlite answers (`MetadataStore.ids_matching`)."""

    path_prefix: str | None
    caption: str | None
    min_similarity: float | None


class Filters(MetaFilters):
    """Every filter of a search: meta.sqlite's and the score floor."""

    min_score: float | None


class UnknownIdError(UserError, KeyError):
    """An image id that is not in the index; a UserError for the CLI, a KeyError for code that maps it to 404."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown image id"


@dataclass
class Hit:
    """One result; `score` is None only for a hit no query ranked (a random sample); `caption` is "" if none."""

    id: int
    score: float | None
    path: str
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
