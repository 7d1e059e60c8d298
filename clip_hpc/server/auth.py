"""Token auth, in one place: where a request's token may come from (header, query, cookie), the per-server cookie
name, and the middleware that guards every route but /health (and times each request for the metrics).

The node is shared with other users, so binding to localhost keeps nobody out: the token does.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from clip_hpc.server.errors import error_response
from clip_hpc.server.metrics import Metrics

TOKEN_ENV = "CLIP_HPC_TOKEN"
OPEN_PATHS = {"/health"}


def resolve_token() -> str:
    """From CLIP_HPC_TOKEN (tests, sbatch), else fresh; never a CLI flag, which `ps` would show to everyone."""
    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32)


def auth_cookie_name(token: str) -> str:
    """Cookies ignore ports, so two servers tunnelled to two localhost ports need two cookie names."""
    return "clip_hpc_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def session_value(token: str) -> str:
    """What the cookie holds: derived from the token (HMAC), never the token itself, so a cookie that leaks (a
    browser profile, a proxy log) cannot be used as a bearer token or printed into a connection URL."""
    return hmac.new(token.encode(), b"clip-hpc browser session", hashlib.sha256).hexdigest()


def token_from_request(request: Request, cookie: str) -> tuple[str | None, str]:
    """(token, where it came from): the header, then the query string, then the cookie."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip(), "header"
    if "token" in request.query_params:
        return request.query_params["token"], "query"
    if cookie in request.cookies:
        return request.cookies[cookie], "cookie"
    return None, ""


def install_auth(app: FastAPI, token: str, metrics: Metrics) -> None:
    """Bearer header, `?token=` (which also sets an HttpOnly SameSite=Strict cookie for the browser) or the cookie,
    which holds `session_value(token)`."""
    cookie = auth_cookie_name(token)
    expected = {"header": token.encode(), "query": token.encode(), "cookie": session_value(token).encode()}

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        given, source = token_from_request(request, cookie)
        if request.url.path in OPEN_PATHS:
            response = await call_next(request)
        elif given is None or not secrets.compare_digest(given.encode(), expected[source]):
            response = error_response(401, "token missing or wrong: open the URL printed by clip-hpc serve (it ends "
                                           "in ?token=...) or send 'Authorization: Bearer TOKEN'")
        else:
            response = await call_next(request)
            if source == "query":
                response.set_cookie(cookie, session_value(token), httponly=True, samesite="strict", path="/")
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "other"), request.method, response.status_code,
                        time.perf_counter() - start)
        return response
