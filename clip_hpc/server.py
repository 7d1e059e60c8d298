"""The HTTP face of an INDEX_DIR: a FastAPI app (routes, token auth, JSON errors, the gallery) and `serve`, which
loads the model and index once, binds a port or a 0600 unix socket, writes the connection file and runs uvicorn.

The node is shared with other users, so binding to localhost keeps nobody out: every route but /health needs
the token. Route handlers are plain `def`s, so FastAPI runs encoding and FAISS search in its threadpool, never
on the event loop.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import secrets
import signal
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi import Path as FastAPIPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from clip_hpc.errors import UserError
from clip_hpc.images import DecodeFailure, decode_image
from clip_hpc.server_support import (BodySizeLimit, Metrics, auth_cookie_name, build_zip, share_model_safely,
                                     token_from_request)

WEB_DIR = Path(__file__).parent / "web"
TOKEN_ENV = "CLIP_HPC_TOKEN"
MAX_K = 1000
MAX_IDS = 1000
MAX_THUMB = 512
OPEN_PATHS = {"/health"}

ImageId = Annotated[int, Field(ge=0, le=2**62)]
PathId = Annotated[int, FastAPIPath(ge=0, le=2**62)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
WeightKey = Literal["text", "image", "vector", "positive", "negative"]


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path_prefix: str | None = Field(None, max_length=4096)


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
    k: int = Field(10, ge=1, le=MAX_K)
    min_score: Finite | None = None
    diversity: float = Field(0.0, ge=0.0, le=1.0)
    filters: Filters | None = None
    return_vector: bool = Field(False, description="add the query vector searched with to the response")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[ImageId] = Field(min_length=1, max_length=MAX_IDS)
    scores: list[Finite | None] | None = Field(None, max_length=MAX_IDS, description="parallel to ids, optional")


class Hit(BaseModel):
    id: int
    score: float | None
    path: str
    url: str
    thumb: str


class Results(BaseModel):
    results: list[Hit]
    took_ms: float


class VectorResults(Results):
    """`query_vector` appears only when asked for (`return_vector`): the unit vector that was searched with."""

    query_vector: list[float] | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """Malformed JSON is a 400; a bad id in the path is a 404 (it names nothing we serve); the rest is a 422."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed JSON body: " + "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
    if errors and all(e.get("loc", ("",))[0] == "path" for e in errors):
        return 404, "not found"
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5]]
    return 422, "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(exc))

    @app.exception_handler(UserError)
    async def user_error(_request: Request, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))


def _install_auth(app: FastAPI, token: str, metrics: Metrics) -> None:
    """Bearer header, `?token=` (which also sets an HttpOnly SameSite=Strict cookie for the browser) or the cookie."""
    cookie = auth_cookie_name(token)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        given, source = token_from_request(request, cookie)
        if request.url.path in OPEN_PATHS:
            response = await call_next(request)
        elif given is None or not secrets.compare_digest(given.encode(), token.encode()):
            response = _error(401, "token missing or wrong: open the URL printed by clip-hpc serve (it ends in "
                                   "?token=...) or send 'Authorization: Bearer TOKEN'")
        else:
            response = await call_next(request)
            if source == "query":
                response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "other"), request.method, response.status_code,
                        time.perf_counter() - start)
        return response


def create_app(engine: Any, token: str, *, max_upload_bytes: int = 20 * 2**20, text_cache_size: int = 1024,
               thumb_cache_size: int = 512) -> FastAPI:
    """The whole HTTP API over one loaded `SearchEngine`; `token` guards every route but /health."""
    if not token:
        raise UserError("the server needs a non-empty token")
    app = FastAPI(title="clip-hpc", version="1", description="Search an image index by text, image or example. "
                  "Every route but /health needs the token (Authorization: Bearer, ?token= or the cookie).")
    metrics = Metrics(index_vectors=int(engine.n))
    share_model_safely(engine, text_cache_size, metrics)
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)
    _install_auth(app, token, metrics)  # added last, so it runs first: no token, no 413 either

    def results(rows: list[tuple[int, float | None, str]], took_start: float) -> Results:
        return Results(results=[Hit(id=i, score=None if s is None else float(s), path=p, url=f"/api/images/{i}",
                                    thumb=f"/api/images/{i}/thumb") for i, s, p in rows],
                       took_ms=round((time.perf_counter() - took_start) * 1000, 3))

    def require_ids(ids: list[int]) -> None:
        missing = [i for i in ids if not engine.contains(i)]
        if missing:
            raise HTTPException(404, f"ids not in the index: {missing[:10]}")

    def decoded(data: bytes) -> Any:
        image = decode_image(data, min_size=engine.model.image_size)  # the pixels `clip-hpc embed` would see
        if isinstance(image, DecodeFailure):
            raise HTTPException(400, f"cannot decode the image: {image}")
        return image

    def run_query(return_vector: bool = False, *, k: int, min_score: float | None = None, diversity: float = 0.0,
                  path_prefix: str | None = None, **parts: Any) -> VectorResults:
        start = time.perf_counter()
        query = engine.query_vector(**parts)
        hits = engine.search_combined(query, k, min_score=min_score, diversity=diversity, path_prefix=path_prefix)
        found = results([(h.id, h.score, h.path) for h in hits], start)
        return VectorResults(results=found.results, took_ms=found.took_ms,
                             **({"query_vector": query.tolist()} if return_vector else {}))

    def file_of(image_id: int) -> Path:
        """Only paths listed in the index are ever served: the id is looked up, never a path from the request."""
        path = engine.path_of(image_id)
        if path is None or not os.path.isfile(path):
            raise HTTPException(404, f"image {image_id} not found" if path is None
                                else f"image {image_id} is in the index but its file is gone")
        return Path(path)

    @lru_cache(maxsize=thumb_cache_size)
    def thumbnail(image_id: int, size: int) -> bytes:
        image = decode_image(file_of(image_id), min_size=size)
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
        return {k: engine.info.get(k) for k in keys}

    @app.get("/api/search", response_model=Results)
    def search_get(q: Annotated[str, Query(max_length=2000)], k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
                   min_score: Annotated[float | None, Query(allow_inf_nan=False)] = None,
                   diversity: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
                   path_prefix: Annotated[str | None, Query(max_length=4096)] = None) -> Results:
        return run_query(text=q, k=k, min_score=min_score, diversity=diversity, path_prefix=path_prefix)

    @app.post("/api/search", response_model=VectorResults, response_model_exclude_unset=True)
    def search_post(body: SearchRequest) -> VectorResults:
        image_ids = [body.image_id] if body.image_id is not None else []
        require_ids([*image_ids, *body.positive_ids, *body.negative_ids])
        images = []
        if body.image_b64:
            try:
                images = [decoded(base64.b64decode(body.image_b64.split(",")[-1], validate=True))]
            except (binascii.Error, ValueError):
                raise HTTPException(400, "image_b64 is not valid base64")
        return run_query(text=body.text, image_ids=image_ids, images=images, vector=body.vector,
                         positive_ids=body.positive_ids, negative_ids=body.negative_ids, weights=body.weights,
                         k=body.k, min_score=body.min_score, diversity=body.diversity,
                         path_prefix=body.filters.path_prefix if body.filters else None,
                         return_vector=body.return_vector)

    @app.post("/api/search/image", response_model=VectorResults, response_model_exclude_unset=True)
    def search_image(file: Annotated[UploadFile, File(description="an image file")],
                     k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
                     path_prefix: Annotated[str | None, Query(max_length=4096)] = None,
                     return_vector: bool = False) -> VectorResults:
        return run_query(images=[decoded(file.file.read())], k=k, path_prefix=path_prefix,
                         return_vector=return_vector)

    @app.get("/api/random", response_model=Results)
    def random(k: Annotated[int, Query(ge=1, le=MAX_K)] = 20) -> Results:
        start = time.perf_counter()
        return results([(i, None, engine.path_of(i) or "") for i in engine.random_ids(k)], start)

    @app.get("/api/images/{image_id}", response_class=FileResponse)
    def image(image_id: PathId) -> FileResponse:
        return FileResponse(file_of(image_id))

    @app.get("/api/images/{image_id}/thumb", response_class=Response)
    def thumb(image_id: PathId, size: Annotated[int, Query(ge=16, le=MAX_THUMB)] = 256) -> Response:
        if not engine.contains(image_id):
            raise HTTPException(404, f"image {image_id} not found")
        return Response(thumbnail(image_id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/export", response_class=FileResponse)
    def export(body: ExportRequest) -> Response:
        require_ids(body.ids)
        if body.scores is not None and len(body.scores) != len(body.ids):
            raise HTTPException(400, f"scores has {len(body.scores)} entries but ids has {len(body.ids)}")
        scores = body.scores or [None] * len(body.ids)
        zip_path = build_zip([(i, file_of(i), s) for i, s in zip(body.ids, scores)])
        return FileResponse(zip_path, media_type="application/zip", filename="clip-hpc-export.zip",
                            background=BackgroundTask(os.unlink, zip_path))

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def gallery() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


class _Stopped(Exception):
    """SIGTERM (scancel, the end of the job's time) after a graceful shutdown: a clean exit, files cleaned up."""


def _stop(_signum: int, _frame: Any) -> None:
    raise _Stopped


def resolve_token() -> str:
    """From CLIP_HPC_TOKEN (tests, sbatch), else fresh; never a CLI flag, which `ps` would show to everyone."""
    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32)


def serve(index_dir: str, *, host: str = "127.0.0.1", port: int = 0, uds: str | None = None,
          connection_file: str | None = None, model: str | None = None, pretrained: str | None = None,
          device: str = "auto", nprobe: int | None = None, max_upload_mb: float = 20.0,
          log_level: str = "warning") -> int:
    """Load once, bind, announce (connection file, ssh command, URL), then serve until SIGINT/SIGTERM."""
    import uvicorn

    from clip_hpc import tunnel
    from clip_hpc.search import SearchEngine

    engine = SearchEngine(index_dir, model_name=model, pretrained=pretrained, device=device, nprobe=nprobe)
    engine.encode_text(["warm up"])  # load the model now, not on the first user's query
    token = resolve_token()
    app = create_app(engine, token, max_upload_bytes=int(max_upload_mb * 2**20))
    sock = tunnel.bind_unix(uds) if uds else tunnel.bind_tcp(host, port)
    uds = str(Path(uds).expanduser().absolute()) if uds else None
    bound_port = None if uds else int(sock.getsockname()[1])
    info = tunnel.connection_info(token=token, port=bound_port, uds=uds, bind_host=host,
                                  index_dir=str(Path(index_dir).absolute()))
    conn_path = tunnel.write_connection_file(connection_file or tunnel.default_connection_path(), info)
    where = uds or f"{host}:{bound_port}"
    print(f"clip-hpc serve: {engine.n} images, listening on {where} (node {info['host']})\n"
          f"  connection file: {conn_path}\n"
          f"  on your laptop:  {info['ssh_command']}\n"
          f"  then open:       {info['url']}", flush=True)
    if not uds and host in tunnel.LOOPBACK:
        print("  (if compute nodes refuse ssh, restart with --host 0.0.0.0 and tunnel through the login node: "
              f"{tunnel.ssh_command(info['host'], port=bound_port, bind_host='0.0.0.0')}; the token still guards it)",
              flush=True)
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                            server_header=False)
    previous = signal.signal(signal.SIGTERM, _stop)  # uvicorn re-raises SIGTERM after its graceful shutdown
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        tunnel.remove_connection_file(conn_path)
        if uds:
            Path(uds).unlink(missing_ok=True)
    return 0
