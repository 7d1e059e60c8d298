"""The browser gallery: "/" (never cached, so a new server's page is never stale) and its /static files."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def gallery() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-store"})


def static_files() -> StaticFiles:
    """The gallery's scripts and styles, which `create_app` mounts at /static."""
    return StaticFiles(directory=WEB_DIR)
