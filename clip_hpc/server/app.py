"""The HTTP API over one loaded `SearchEngine`: routes, the gallery, and the middleware stack (auth, upload limit).

Route handlers are plain `def`s, so FastAPI runs encoding and FAISS search in its threadpool, never on the event
loop (GET /api/search awaits its micro-batch there instead: still never blocking it); it therefore serves a
`ServedEngine` (`serve.load_engine`), whose shared encoder runs every model call on the runtime's compute thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import threading
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from clip_hpc.errors import UserError
from clip_hpc.ingest.images import DecodeFailure, decode_image
from clip_hpc.search.engine import MAX_K, Hit
from clip_hpc.server.auth import install_auth
from clip_hpc.server.batched_search import BatchedSearch, shares_batches
from clip_hpc.server.errors import install_error_handlers
from clip_hpc.server.export import build_zip
from clip_hpc.server.files import Servable, ServableObject, servable_file, servable_object, served_root
from clip_hpc.server.image_source import ImageSource, locate
from clip_hpc.server.in_flight import CountInFlight
from clip_hpc.server.metrics import Metrics, batch_metric_lines
from clip_hpc.server.schemas import MAX_THUMB, ExportRequest, PathId, Results, SearchRequest, ServedHit, VectorResults
from clip_hpc.server.served_engine import ServedEngine
from clip_hpc.server.upload_limit import BodySizeLimit

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(
    served: ServedEngine,
    token: str,
    *,
    max_upload_bytes: int = 20 * 2**20,
    thumb_cache_size: int = 512,
    max_decodes: int = 2,
) -> FastAPI:
    """The whole HTTP API over `served`; `token` guards every route but /health."""
    if not token:
        raise UserError("the server needs a non-empty token")
    engine, encoder, runtime = served.engine, served.encoder, served.runtime
    app = FastAPI(
        title="clip-hpc",
        version="1",
        description="Search an image index by text, image or example. "
        "Every route but /health needs the token (Authorization: Bearer, ?token= or the cookie).",
    )
    searcher = BatchedSearch(engine, encoder, runtime)
    recorded = engine.info.to_dict()  # /api/info reports what index.json records (null for a key it lacks)
    root = served_root(engine.meta)
    decode_slots = threading.BoundedSemaphore(max_decodes)  # a full-size decode can take hundreds of MB
    metrics = Metrics(
        index_vectors=int(engine.n),
        cache_counts=encoder.cache_counts,
        extra=lambda: batch_metric_lines(runtime.batch_sizes()),
    )
    install_error_handlers(app)
    app.add_middleware(CountInFlight, in_flight=runtime.in_flight)
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)
    install_auth(app, token, metrics)  # added last, so it runs first: no token, no 413 either

    def results(hits: list[Hit], took_start: float) -> Results:
        return Results(
            results=[ServedHit.of(hit) for hit in hits], took_ms=round((time.perf_counter() - took_start) * 1000, 3)
        )

    def require_ids(ids: list[int]) -> None:
        missing = [i for i in ids if not engine.contains(i)]
        if missing:
            raise HTTPException(404, f"ids not in the index: {missing[:10]}")

    def decoded(data: bytes) -> Image.Image:
        with decode_slots:
            image = decode_image(data, min_size=encoder.image_size)  # the pixels `clip-hpc embed` would see
        if isinstance(image, DecodeFailure):
            raise HTTPException(400, f"cannot decode the image: {image}")
        return image

    def run_query(
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
        start = time.perf_counter()
        text_alone = isinstance(parts.get("text"), str) and not any(v for name, v in parts.items() if name != "text")
        if text_alone and shares_batches(diversity, path_prefix, caption, min_similarity):
            query, hits = searcher.search_text(parts["text"], k, min_score=min_score)
        else:
            query = engine.query_vector(**parts)
            hits = searcher.search_combined(
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

    def source_of(image_id: int) -> tuple[ImageSource, Servable | ServableObject]:
        """Only images listed in the index are ever served (the id is looked up, never a path from the request),
        and only when `servable_file` allows the file that holds them (regular, readable, under the indexed tree),
        or `servable_object` the object (it exists, one HEAD); a tar member is then read from that checked file
        or object by its stored offset."""
        source = locate(engine.record(image_id))
        if source is None:
            raise HTTPException(404, f"image {image_id} not found")
        found = servable_object(source.path) if isinstance(source.path, str) else servable_file(str(source.path), root)
        if isinstance(found, str):
            raise HTTPException(404, f"image {image_id} {found}")
        source = replace(source, path=found.path)
        if not source.available(getattr(found, "size", None)):
            raise HTTPException(404, f"image {image_id} is in the index but its bytes are gone (a shorter tar?)")
        return source, found

    def read_source(image_id: int, source: ImageSource) -> bytes:
        try:
            return source.read_bytes()
        except OSError as exc:  # vanished or unreadable since it was judged servable
            raise HTTPException(404, f"image {image_id} cannot be read ({exc.strerror or exc})") from None

    def thumbnail(image_id: int, size: int) -> bytes:
        """Cached by the file's identity (inode, size, mtime; an object's ETag or size and last-modified): a replaced
        or deleted file is never served stale."""
        source, found = source_of(image_id)
        return cached_thumbnail(image_id, source, found.identity, size)

    @lru_cache(maxsize=thumb_cache_size)
    def cached_thumbnail(image_id: int, source: ImageSource, _identity: tuple, size: int) -> bytes:
        data = source.path if source.member is None and not source.remote else read_source(image_id, source)
        with decode_slots:
            image = decode_image(data, min_size=size)
        if isinstance(image, DecodeFailure):
            raise HTTPException(404, f"image {image_id} cannot be decoded: {image}")
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        keys = ("n", "dim", "model", "pretrained", "index_key", "nprobe", "refine")
        return {
            **{k: recorded.get(k) for k in keys},
            "vectors": engine.info.vectors,  # images or captions
            "text_context": encoder.text_context,
        }

    @app.get("/api/search", response_model=Results)
    async def search_get(
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
        if shares_batches(diversity, path_prefix, caption, min_similarity) and searcher.fuses(q):
            start = time.perf_counter()
            _query, hits = await asyncio.wrap_future(searcher.search_text_future(q, k, min_score=min_score))
            return results(hits, start)
        return await run_in_threadpool(
            run_query,
            text=q,
            k=k,
            min_score=min_score,
            diversity=diversity,
            path_prefix=path_prefix,
            caption=caption,
            min_similarity=min_similarity,
        )

    @app.post("/api/search", response_model=VectorResults, response_model_exclude_unset=True)
    def search_post(body: SearchRequest) -> VectorResults:
        image_ids = [body.image_id] if body.image_id is not None else []
        require_ids([*image_ids, *body.positive_ids, *body.negative_ids])
        images = []
        if body.image_b64:
            try:
                images = [decoded(base64.b64decode(body.image_b64.split(",")[-1], validate=True))]
            except (binascii.Error, ValueError):
                raise HTTPException(400, "image_b64 is not valid base64") from None
        return run_query(
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

    @app.post("/api/search/image", response_model=VectorResults, response_model_exclude_unset=True)
    def search_image(
        file: Annotated[list[UploadFile], File(description="one image file")],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        path_prefix: Annotated[str | None, Query(max_length=4096)] = None,
        return_vector: bool = False,
    ) -> VectorResults:
        if len(file) != 1:  # several parts named `file` were answered for the last one, without a word
            raise HTTPException(400, f"send one image in the form field 'file', not {len(file)}")
        return run_query(
            images=[decoded(file[0].file.read())], k=k, path_prefix=path_prefix, return_vector=return_vector
        )

    @app.get("/api/random", response_model=Results)
    def random(k: Annotated[int, Query(ge=1, le=MAX_K)] = 20) -> Results:
        start = time.perf_counter()
        return results(engine.hits_for_ids(engine.random_ids(k)), start)

    @app.get("/api/images/{image_id}", response_class=FileResponse)
    def image(image_id: PathId) -> Response:
        source, found = source_of(image_id)
        if isinstance(found, Servable) and source.member is None:
            return FileResponse(found.path, stat_result=found.stat)
        return Response(read_source(image_id, source), media_type=source.media_type)

    app.add_api_route("/api/images/{image_id}", image, methods=["HEAD"], include_in_schema=False)  # HEAD = GET

    @app.get("/api/images/{image_id}/thumb", response_class=Response)
    def thumb(image_id: PathId, size: Annotated[int, Query(ge=16, le=MAX_THUMB)] = 256) -> Response:
        if not engine.contains(image_id):
            raise HTTPException(404, f"image {image_id} not found")
        return Response(
            thumbnail(image_id, size), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
        )

    @app.post("/api/export", response_class=FileResponse)
    def export(body: ExportRequest) -> Response:
        require_ids(body.ids)
        if body.scores is not None and len(body.scores) != len(body.ids):
            raise HTTPException(400, f"scores has {len(body.scores)} entries but ids has {len(body.ids)}")
        scores = body.scores or [None] * len(body.ids)
        chosen = dict(zip(reversed(body.ids), reversed(scores)))  # one copy per id, its first score
        zip_path = build_zip([(i, source_of(i)[0], chosen[i]) for i in dict.fromkeys(body.ids)])
        return FileResponse(
            zip_path,
            media_type="application/zip",
            filename="clip-hpc-export.zip",
            background=BackgroundTask(os.unlink, zip_path),
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def gallery() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app
