"""Holding the server up against idle and half-sent connections (slow-loris) from anyone on the node, token or not.

- A request's headers must arrive within `header_timeout` seconds of the connection opening (or of the previous
  response): dribbling bytes does not reset the clock, unlike uvicorn's keep-alive timer.
- At most `max_connections` are open, fewer than the file-descriptor limit allows; past that the connection that
  has waited longest for its headers is closed, so a working client always gets in.
- The log says so at a bounded rate instead of one traceback per refused connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # checked against the parser uvicorn uses when httptools is installed (a dependency)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as FastestProtocol
else:
    try:  # uvicorn's C parser: less CPU a request than h11's pure Python, on cores the model needs
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as FastestProtocol
    except ImportError:  # httptools is a dependency; a source install without a compiler still serves, on h11
        from uvicorn.protocols.http.h11_impl import H11Protocol as FastestProtocol

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1024
FD_RESERVE = 64  # descriptors kept for the index, the metadata store, uploads and exports
ACCEPT_BATCH = 8  # connections asyncio accepts per wake-up (uvicorn's `backlog`) before the cap can act
ACCEPT_SLACK = 4 * ACCEPT_BATCH  # accepted while closed ones are still being torn down


def connection_cap(requested: int | None = None) -> int:
    """The most connections this process can hold without running out of descriptors (RLIMIT_NOFILE)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 32
    room = (soft if soft != resource.RLIM_INFINITY else 1 << 20) - in_use - FD_RESERVE - ACCEPT_SLACK
    return max(8, min(requested or DEFAULT_MAX_CONNECTIONS, room))


class GuardedProtocol(FastestProtocol):
    """uvicorn's HTTP protocol (httptools, else h11) with an absolute header deadline and a connection cap
    (set by `guarded_protocol`)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _deadline: asyncio.TimerHandle | None = None  # when the headers must have arrived by
    _waiting_since: float | None = None  # since when this connection has waited for request headers
    _answered: int = 0  # responses completed on this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn: BaseTransport
        super().connection_made(transport)
        self._arm_header_deadline()
        if sum(not c.transport.is_closing() for c in self.connections) > self.max_connections:
            self._evict_one()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._busy():
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._answered += 1
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser rejects never reaches the app, and uvicorn answers it in plain text; every
        error of this API is JSON, this one too (then the connection closes, as uvicorn's does)."""
        body = json.dumps({"error": f"{msg.rstrip('.')}: not a valid HTTP/1.1 request"}).encode()
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    # --- the guard ---
    def _busy(self) -> bool:
        """A request has been received and not yet answered."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._waiting_since = time.monotonic()
        self._deadline = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_header_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._waiting_since = None

    def _header_timeout_expired(self) -> None:
        self._deadline = None
        if not self._busy() and not self.transport.is_closing():
            RATE_LIMITED.note(
                f"closed connections whose request headers did not arrive within {self.header_timeout:g} s"
            )
            self.transport.close()

    def _evict_one(self) -> None:
        """Close a connection waiting for its headers: first those that never completed a request (idle or
        half-sent sockets), the longest waiting first, then kept-alive clients; if every one is busy, the newest."""
        waiting = [
            (c._answered > 0, c._waiting_since, c)
            for c in self.connections
            if isinstance(c, GuardedProtocol)  # every connection of a server running this protocol
            and c._waiting_since is not None
            and not c._busy()
            and not c.transport.is_closing()
        ]
        victim = min(waiting, key=lambda entry: entry[:2])[2] if waiting else self
        RATE_LIMITED.note(f"at the connection cap ({self.max_connections}): closed idle connections")
        victim.transport.close()


def guarded_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT, max_connections: int | None = None) -> type:
    """A `GuardedProtocol` subclass with these limits, for `uvicorn.Config(http=...)`."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"header_timeout": float(header_timeout), "max_connections": connection_cap(max_connections)},
    )


class RateLimitedLog(logging.Filter):
    """At most `per_minute` records per logger and message kind each minute, then one line saying how many were
    dropped: a flood of refused connections cannot fill the disk with the job's log."""

    def __init__(self, per_minute: int = 10) -> None:
        super().__init__()
        self.per_minute = per_minute
        self.window_start = time.monotonic()
        self.counts: dict[str, int] = {}
        self.logger = logging.getLogger("clip_hpc.server")

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.window_start > 60:
            dropped = sum(max(0, c - self.per_minute) for c in self.counts.values())
            self.window_start, self.counts = now, {}
            if dropped:
                self.counts["dropped"] = 1
                self.logger.warning("%d similar log lines dropped in the last minute", dropped)
        key = f"{record.name}:{record.msg}"[:120]
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key] <= self.per_minute

    def note(self, message: str) -> None:
        self.logger.warning(message, stacklevel=2)


RATE_LIMITED = RateLimitedLog()


def install_log_rate_limit() -> None:
    """On the loggers a flood of connections writes to (asyncio's accept errors, uvicorn's, ours)."""
    for name in ("asyncio", "uvicorn.error", "clip_hpc.server"):
        logger = logging.getLogger(name)
        if RATE_LIMITED not in logger.filters:
            logger.addFilter(RATE_LIMITED)
