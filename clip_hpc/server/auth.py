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

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_hpc.server.errors import error_response
from clip_hpc.server.metrics import Metrics
from clip_hpc.server.token_env import TOKEN_ENV

OPEN_PATHS = {"/health"}


def resolve_token() -> str:
    """From TOKEN_ENV (tests, sbatch), else fresh; never a CLI flag, which `ps` would show to everyone."""
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
    app.add_middleware(TokenAuth, token=token, metrics=metrics)


class TokenAuth:
    """Plain ASGI middleware (not `@app.middleware`, which spawns a task and memory streams for every request, CPU a
    2-core node under load needs for the model): checks the token, answers 401 without it, sets the cookie, times
    each request."""

    def __init__(self, app: ASGIApp, token: str, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.cookie = auth_cookie_name(token)
        self.expected = {"header": token.encode(), "query": token.encode(), "cookie": session_value(token).encode()}
        cookie_setter = Response()
        cookie_setter.set_cookie(self.cookie, session_value(token), httponly=True, samesite="strict", path="/")
        self.set_cookie = [(k, v) for k, v in cookie_setter.raw_headers if k == b"set-cookie"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        given, source = token_from_request(Request(scope), self.cookie)
        status, add_cookie = 500, False

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if add_cookie:
                    message = {**message, "headers": [*message.get("headers", []), *self.set_cookie]}
            await send(message)

        try:
            if scope["path"] in OPEN_PATHS:
                await self.app(scope, receive, send_noting_status)
            elif given is None or not secrets.compare_digest(given.encode(), self.expected[source]):
                await error_response(
                    401,
                    "token missing or wrong: open the URL printed by clip-hpc serve (it ends "
                    "in ?token=...) or send 'Authorization: Bearer TOKEN'",
                )(scope, receive, send_noting_status)
            else:
                add_cookie = source == "query"
                await self.app(scope, receive, send_noting_status)
        finally:
            route = scope.get("route")
            self.metrics.observe(getattr(route, "path", "other"), scope["method"], status, time.perf_counter() - start)
