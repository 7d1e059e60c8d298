"""Search routes: GET /api/search (text), POST /api/search (any mix of text, images, ids, a vector), POST
/api/search/image (an upload) and /api/random.

Handlers are plain `def`s, so FastAPI runs encoding and FAISS search in its threadpool, never on the event loop
(GET /api/search awaits its micro-batch there instead: still never blocking it)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.exceptions import HTTPException

from clip_hpc.ingest.images import DecodeFailure, decode_image
from clip_hpc.search.records import MAX_K, Hit
from clip_hpc.server.batched_search import shares_batches
from clip_hpc.server.routes.state import AppState, State
from clip_hpc.server.schemas import Results, SearchRequest, ServedHit, VectorResults

router = APIRouter()


def results(hits: list[Hit], took_start: float) -> Results:
    return Results(
        results=[ServedHit.of(hit) for hit in hits], took_ms=round((time.perf_counter() - took_start) * 1000, 3)
    )


def decoded(state: AppState, data: bytes) -> Image.Image:
    with state.decode_slots:
        image = decode_image(data, min_size=state.encoder.image_size)  # the pixels `clip-hpc embed` would see
    if isinstance(image, DecodeFailure):
        raise HTTPException(400, f"cannot decode the image: {image}")
    return image


def run_query(
    state: AppState,
    return_vector: bool = False,
    *,
    k: int,
    min_score: float | None = None,
    diversity: float = 0.0,
    path_prefix: str | None = None,
    caption: str | None = None,
    min_similarity: float | None = None,
    **parts: Any,
) -> VectorResults:
    """A text alone that can share a micro-batch goes through the text stage; anything else is combined into one
    query vector first."""
    start = time.perf_counter()
    text_alone = isinstance(parts.get("text"), str) and not any(v for name, v in parts.items() if name != "text")
    if text_alone and shares_batches(diversity, path_prefix, caption, min_similarity):
        query, hits = state.searcher.search_text(parts["text"], k, min_score=min_score)
    else:
        query = state.engine.query_vector(**parts)
        hits = state.searcher.search_combined(
            query,
            k,
            min_score=min_score,
            diversity=diversity,
            path_prefix=path_prefix,
            caption=caption,
            min_similarity=min_similarity,
        )
    found = results(hits, start)
    return VectorResults(
        results=found.results, took_ms=found.took_ms, **({"query_vector": query.tolist()} if return_vector else {})
    )


@router.get("/api/search", response_model=Results)
async def search_get(
    state: State,
    q: Annotated[str, Query(max_length=2000)],
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    min_score: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    diversity: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
    path_prefix: Annotated[str | None, Query(max_length=4096)] = None,
    caption: Annotated[str | None, Query(max_length=2000)] = None,
    min_similarity: Annotated[float | None, Query(allow_inf_nan=False)] = None,
) -> Results:
    """Async so that the common query (a new text, no filters) awaits its micro-batch on the event loop; any
    other runs in the threadpool like the other routes."""
    if shares_batches(diversity, path_prefix, caption, min_similarity) and state.searcher.fuses(q):
        start = time.perf_counter()
        _query, hits = await asyncio.wrap_future(state.searcher.search_text_future(q, k, min_score=min_score))
        return results(hits, start)
    return await run_in_threadpool(
        run_query,
        state,
        text=q,
        k=k,
        min_score=min_score,
        diversity=diversity,
        path_prefix=path_prefix,
        caption=caption,
        min_similarity=min_similarity,
    )


@router.post("/api/search", response_model=VectorResults, response_model_exclude_unset=True)
def search_post(state: State, body: SearchRequest) -> VectorResults:
    image_ids = [body.image_id] if body.image_id is not None else []
    state.require_ids([*image_ids, *body.positive_ids, *body.negative_ids])
    images = []
    if body.image_b64:
        try:
            images = [decoded(state, base64.b64decode(body.image_b64.split(",")[-1], validate=True))]
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image_b64 is not valid base64") from None
    return run_query(
        state,
        text=body.text,
        image_ids=image_ids,
        images=images,
        vector=body.vector,
        positive_ids=body.positive_ids,
        negative_ids=body.negative_ids,
        weights=body.weights,
        k=body.k,
        min_score=body.min_score,
        diversity=body.diversity,
        path_prefix=body.filters.path_prefix if body.filters else None,
        caption=body.filters.caption if body.filters else None,
        min_similarity=body.filters.min_similarity if body.filters else None,
        return_vector=body.return_vector,
    )


@router.post("/api/search/image", response_model=VectorResults, response_model_exclude_unset=True)
def search_image(
    state: State,
    file: Annotated[list[UploadFile], File(description="one image file")],
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    path_prefix: Annotated[str | None, Query(max_length=4096)] = None,
    return_vector: bool = False,
) -> VectorResults:
    if len(file) != 1:  # several parts named `file` were answered for the last one, without a word
        raise HTTPException(400, f"send one image in the form field 'file', not {len(file)}")
    return run_query(
        state, images=[decoded(state, file[0].file.read())], k=k, path_prefix=path_prefix, return_vector=return_vector
    )


@router.get("/api/random", response_model=Results)
def random(state: State, k: Annotated[int, Query(ge=1, le=MAX_K)] = 20) -> Results:
    start = time.perf_counter()
    return results(state.engine.hits_for_ids(state.engine.random_ids(k)), start)
