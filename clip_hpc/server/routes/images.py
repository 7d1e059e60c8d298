"""Image routes: /api/images/{id} (GET and HEAD: the file, or a tar member's or object's bytes) and its /thumb."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException

from clip_hpc.server.files import Servable
from clip_hpc.server.routes.state import State
from clip_hpc.server.schemas import MAX_THUMB, PathId

router = APIRouter()


@router.get("/api/images/{image_id}", response_class=FileResponse)
def image(state: State, image_id: PathId) -> Response:
    source, found = state.images.source_of(image_id)
    if isinstance(found, Servable) and source.member is None:
        return FileResponse(found.path, stat_result=found.stat)
    return Response(state.images.read(image_id, source), media_type=source.media_type)


router.add_api_route("/api/images/{image_id}", image, methods=["HEAD"], include_in_schema=False)  # HEAD = GET


@router.get("/api/images/{image_id}/thumb", response_class=Response)
def thumb(state: State, image_id: PathId, size: Annotated[int, Query(ge=16, le=MAX_THUMB)] = 256) -> Response:
    if not state.engine.contains(image_id):
        raise HTTPException(404, f"image {image_id} not found")
    return Response(
        state.images.thumbnail(image_id, size),
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=3600"},
    )
