"""The HTTP API over one loaded `SearchEngine`: the routers (server/routes/), the gallery, and the middleware stack
(auth, upload limit).

Route handlers are plain `def`s, so FastAPI runs encoding and FAISS search in its threadpool, never on the event
loop; it therefore serves a `ServedEngine` (`serve.load_engine`), whose shared encoder runs every model call on the
runtime's compute thread. Routes reach it through `routes.state.AppState`, stored on `app.state`.
"""

from __future__ import annotations

from fastapi import FastAPI

from clip_hpc.errors import UserError
from clip_hpc.server.auth import install_auth
from clip_hpc.server.errors import install_error_handlers
from clip_hpc.server.in_flight import CountInFlight
from clip_hpc.server.routes import export, gallery, images, search, status
from clip_hpc.server.routes.state import AppState, install_state
from clip_hpc.server.served_engine import ServedEngine
from clip_hpc.server.upload_limit import BodySizeLimit


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
    app = FastAPI(
        title="clip-hpc",
        version="1",
        description="Search an image index by text, image or example. "
        "Every route but /health needs the token (Authorization: Bearer, ?token= or the cookie).",
    )
    state = AppState.build(served, thumb_cache_size=thumb_cache_size, max_decodes=max_decodes)
    install_state(app, state)
    install_error_handlers(app)
    app.add_middleware(CountInFlight, in_flight=served.runtime.in_flight)
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)
    install_auth(app, token, state.metrics)  # added last, so it runs first: no token, no 413 either
    for module in (status, search, images, export, gallery):
        app.include_router(module.router)
    app.mount("/static", gallery.static_files(), name="static")
    return app
