"""Every error the API returns is JSON `{"error": "what is wrong"}`: FastAPI's own errors and a `UserError` from
the engine are mapped here, to the status that says whose fault it is."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from clip_hpc.errors import UserError


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """Malformed JSON is a 400; a bad id in the path is a 404 (it names nothing we serve); the rest is a 422."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed JSON body: " + "; ".join(
            str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors
        )
    if errors and all(e.get("loc", ("",))[0] == "path" for e in errors):
        return 404, "not found"
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5]]
    return 422, "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(*validation_message(exc))

    @app.exception_handler(UserError)
    async def user_error(_request: Request, exc: UserError) -> JSONResponse:
        return error_response(400, str(exc))
