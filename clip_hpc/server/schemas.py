"""The API's request and response bodies. A hit is the engine's `Hit` plus the two URLs the gallery needs; the
bounds (`MAX_K`) are the engine's, so the HTTP API and the CLI accept the same queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Path as FastAPIPath
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from clip_hpc.search.records import MAX_K, Hit

MAX_IDS = 1000
MAX_THUMB = 512

PathId = Annotated[int, FastAPIPath(ge=0, le=2**62)]


def not_a_boolean(value: object) -> object:
    """pydantic reads `true` as 1.0 for a float: `min_similarity: true` would filter at 1.0, without a word."""
    if isinstance(value, bool):
        raise ValueError("a number, not true or false")
    return value


Finite = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(not_a_boolean)]
ImageId = Annotated[int, Field(ge=0, le=2**62), BeforeValidator(not_a_boolean)]
ResultCount = Annotated[int, Field(ge=1, le=MAX_K), BeforeValidator(not_a_boolean)]  # `k: true` was k=1
Fraction = Annotated[float, Field(ge=0.0, le=1.0), BeforeValidator(not_a_boolean)]
WeightKey = Literal["text", "image", "vector", "positive", "negative"]


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path_prefix: str | None = Field(None, max_length=4096)
    caption: str | None = Field(None, max_length=2000, description="full-text filter: captions holding every word")
    min_similarity: Finite | None = Field(
        None, description="only images whose stored image-caption cosine (embed --captions) is at least this"
    )


class SearchRequest(BaseModel):
    """Any combination of parts; `weights` scales each part (negative examples subtract, Rocchio-style)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=2000)
    image_id: ImageId | None = None
    image_b64: str | None = None
    vector: list[Finite] | None = Field(None, max_length=8192)
    positive_ids: list[ImageId] = Field(default_factory=list, max_length=MAX_IDS)
    negative_ids: list[ImageId] = Field(default_factory=list, max_length=MAX_IDS)
    weights: dict[WeightKey, Finite] | None = None
    k: ResultCount = 10
    min_score: Finite | None = None
    diversity: Fraction = 0.0
    filters: Filters | None = None
    return_vector: bool = Field(False, description="add the query vector searched with to the response")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[ImageId] = Field(min_length=1, max_length=MAX_IDS)
    scores: list[Finite | None] | None = Field(None, max_length=MAX_IDS, description="parallel to ids, optional")


@dataclass
class ServedHit(Hit):
    """The engine's hit, plus where the gallery fetches the image and its thumbnail."""

    url: str = ""
    thumb: str = ""

    @classmethod
    def of(cls, hit: Hit) -> ServedHit:
        return cls(
            hit.id, hit.score, hit.path, hit.caption, url=f"/api/images/{hit.id}", thumb=f"/api/images/{hit.id}/thumb"
        )


class Results(BaseModel):
    results: list[ServedHit]
    took_ms: float


class VectorResults(Results):
    """`query_vector` appears only when asked for (`return_vector`): the unit vector that was searched with."""

    query_vector: list[float] | None = None
