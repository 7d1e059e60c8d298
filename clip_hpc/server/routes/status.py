"""What the server reports about itself: /health (open, no token), /api/info and /metrics (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from clip_hpc.server.routes.state import State

router = APIRouter()

INFO_KEYS = ("n", "dim", "model", "pretrained", "index_key", "nprobe", "refine")


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/api/info")
def info(state: State) -> dict[str, Any]:
    # no docstring: it would become the route's OpenAPI description
    return {  # what index.json records (null for a key it lacks), what the index holds, the text context served
        **{k: state.recorded.get(k) for k in INFO_KEYS},
        "vectors": state.engine.info.vectors,  # images or captions
        "text_context": state.encoder.text_context,
    }


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(state: State) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")
