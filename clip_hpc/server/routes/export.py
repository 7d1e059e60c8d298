"""POST /api/export: the chosen images (each once, with its first score) as one ZIP, deleted once sent."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from clip_hpc.server.export import build_zip
from clip_hpc.server.routes.state import State
from clip_hpc.server.schemas import ExportRequest

router = APIRouter()


@router.post("/api/export", response_class=FileResponse)
def export(state: State, body: ExportRequest) -> Response:
    state.require_ids(body.ids)
    if body.scores is not None and len(body.scores) != len(body.ids):
        raise HTTPException(400, f"scores has {len(body.scores)} entries but ids has {len(body.ids)}")
    scores = body.scores or [None] * len(body.ids)
    chosen = dict(zip(reversed(body.ids), reversed(scores)))  # one copy per id, its first score
    sources = [(i, state.images.source_of(i)[0], chosen[i]) for i in dict.fromkeys(body.ids)]
    zip_path = build_zip(sources, state.images.read)
    return FileResponse(
        zip_path,
        media_type="application/zip",
        filename="clip-hpc-export.zip",
        background=BackgroundTask(os.unlink, zip_path),
    )
