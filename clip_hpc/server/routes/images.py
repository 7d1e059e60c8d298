"""Image routes: /api/images/{id} (GET and HEAD: the file, or a tar member's or object's bytes) and its /thumb."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from clip_hpc.server.errors import error_response
from clip_hpc.server.files import Servable
from clip_hpc.server.routes.state import State
from clip_hpc.server.schemas import MAX_THUMB, PathId

router = APIRouter()


class RangedFile(FileResponse):
    """A FileResponse whose answers to a bad `Range` header are JSON errors like every other (Starlette's own are
    plain text), judged by Starlette's own parser before it would answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        asked, if_range = headers.get("range"), headers.get("if-range")
        if (
            asked is not None
            and self.stat_result is not None
            and (if_range is None or self._should_use_range(if_range))
        ):
            size = self.stat_result.st_size
            try:
                self._parse_range_header(asked, size)
            except MalformedRangeHeader as exc:
                return await error_response(400, f"bad Range header: {exc.content}")(scope, receive, send)
            except RangeNotSatisfiable:
                response = error_response(416, f"Range not satisfiable: the image has {size} bytes")
                response.headers["Content-Range"] = f"bytes */{size}"
                return await response(scope, receive, send)
        await super().__call__(scope, receive, send)


@router.get("/api/images/{image_id}", response_class=FileResponse)
def image(state: State, image_id: PathId) -> Response:
    source, found = state.images.source_of(image_id)
    if isinstance(found, Servable) and source.member is None:
        return RangedFile(found.path, stat_result=found.stat)
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


router.add_api_route("/api/images/{image_id}/thumb", thumb, methods=["HEAD"], include_in_schema=False)  # HEAD = GET
