"""The in-flight heuristic that tells a micro-batch stage whether to wait: how many requests on the batched routes
are on their way to it (`InFlight`), counted by an ASGI middleware (`CountInFlight`). Nobody waits longer than the
window for an unrelated request, and a lone client never waits at all."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from clip_hpc.server.micro_batch import BatchSettings, Item, MicroBatcher, Result

BATCHED_ROUTES = ("/api/search",)  # the prefix of the routes whose requests a stage may wait for


class InFlight:
    """How many requests on the batched routes are on their way to a stage: those the server holds now, plus the
    kept-alive connections answered a moment ago (`recent_s`), since a client with more to ask sends its next query
    within a few milliseconds. Without the second part, clients settle into two groups that alternate batches: a
    batch starts as soon as the previous group's answers leave, a moment before those clients ask again. Only a
    connection that has carried two requests counts (one opened per request would only make the next one wait)."""

    def __init__(self, recent_s: float = 0.02, remembered: int = 4096) -> None:
        self.count = 0  # updated on the event loop only
        self.recent_s, self.remembered = recent_s, remembered
        self.requests: OrderedDict[Any, int] = OrderedDict()  # connection -> requests it has carried
        self.answered: dict[Any, float] = {}  # reused connections answered lately -> when (pruned by `expected`)
        self.lock = threading.Lock()
        self.stages: list[MicroBatcher] = []

    def stage(
        self, name: str, run_batch: Callable[[list[Item]], Sequence[Result]], settings: BatchSettings
    ) -> MicroBatcher[Item, Result]:
        """A stage that waits for the requests on their way to it (see `expected_for`)."""
        stage: MicroBatcher = MicroBatcher(name, run_batch, settings, lambda: self.expected_for(stage))
        self.stages.append(stage)
        return stage

    def started(self, connection: Any) -> None:
        self.count += 1
        if connection is None:
            return
        with self.lock:
            self.answered.pop(connection, None)
            self.requests[connection] = self.requests.pop(connection, 0) + 1
            while len(self.requests) > self.remembered:
                self.answered.pop(self.requests.popitem(last=False)[0], None)

    def finished(self, connection: Any) -> None:
        self.count -= 1
        with self.lock:
            if self.requests.get(connection, 0) >= 2:
                self.answered[connection] = time.monotonic()

    def expected(self) -> int:
        """Requests held now plus reused connections answered within `recent_s`."""
        since = time.monotonic() - self.recent_s
        with self.lock:
            for connection in [c for c, at in self.answered.items() if at < since]:
                del self.answered[connection]
            return self.count + len(self.answered)

    def expected_for(self, stage: MicroBatcher) -> int:
        """`expected()` less what the other stages hold: a request queued for (or inside) the text stage reaches
        the search stage only after a whole encode, so the search stage must not wait for it (the two stages
        would otherwise each wait out the window for the other's requests)."""
        return self.expected() - sum(other.held() for other in self.stages if other is not stage)


class CountInFlight:
    """ASGI middleware: counts requests on the batched routes from their arrival until their last body chunk is
    handed to the socket (not after: a client's next request may arrive before this task resumes, and a stale
    count would make a lone client's query wait out the window); the connection is then remembered as answered."""

    def __init__(self, app: Any, in_flight: InFlight) -> None:
        self.app, self.in_flight = app, in_flight

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(BATCHED_ROUTES):
            return await self.app(scope, receive, send)
        counted = True
        connection = tuple(scope["client"]) if scope.get("client") else None  # (host, port): one connection
        self.in_flight.started(connection)

        async def send_and_uncount(message: dict) -> None:
            nonlocal counted
            if counted and message["type"] == "http.response.body" and not message.get("more_body", False):
                counted = False
                self.in_flight.finished(connection)
            await send(message)

        try:
            await self.app(scope, receive, send_and_uncount)
        finally:
            if counted:
                self.in_flight.finished(connection)
