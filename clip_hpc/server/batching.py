"""Micro-batching for the server: concurrent requests' model calls and FAISS searches are gathered for at most a
few milliseconds (or up to a batch size) and run as one call, because on a CPU a batch of 8 texts costs little more
than one (the weights are read once), and FAISS answers several queries in one pass.

A stage (`MicroBatcher`) runs on its own thread. It waits for more items only while more requests are on their way
to it than it holds (`InFlight`: requests on the search routes, counted by an ASGI middleware, and kept-alive
connections just answered, less what the other stages hold), so a lone client never waits for a window, and
nobody waits longer than the window for an unrelated request. A batch that fails is re-run item by
item, so one bad request gets its own error and the others their results.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Sequence, TypeVar

import numpy as np

from clip_hpc.server.batch_defaults import BATCH_WINDOW_MS, MAX_BATCH
from clip_hpc.errors import UserError
from clip_hpc.search.core import combine_parts

if TYPE_CHECKING:
    from clip_hpc.search.engine import Hit, SearchEngine
    from clip_hpc.server.compute import ComputeThread
    from clip_hpc.server.shared_encoder import SharedEncoder

Item = TypeVar("Item")
Result = TypeVar("Result")
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
BATCHED_ROUTES = ("/api/search",)  # the prefix of the routes whose requests a stage may wait for


@dataclass(frozen=True)
class BatchSettings:
    """`window_ms`: the longest a batch waits for more requests; `max_batch`: the most items in one call."""

    window_ms: float = BATCH_WINDOW_MS
    max_batch: int = MAX_BATCH

    def __post_init__(self) -> None:
        if not (0 <= self.window_ms <= 10_000 and self.max_batch >= 1):
            raise UserError("--batch-window-ms must be between 0 and 10000 and --max-batch at least 1")


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

    def stage(self, name: str, run_batch: Callable[[list[Item]], Sequence[Result]],
              settings: BatchSettings) -> MicroBatcher[Item, Result]:
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


class MicroBatcher(Generic[Item, Result]):
    """`submit(item)` from any thread blocks until `run_batch([..., item, ...])` has produced that item's result."""

    def __init__(self, name: str, run_batch: Callable[[list[Item]], Sequence[Result]], settings: BatchSettings,
                 expected: Callable[[], int] = lambda: 0) -> None:
        self.name, self.run_batch, self.settings, self.expected = name, run_batch, settings, expected
        self.cond = threading.Condition()
        self.queue: list[tuple[Item, Future]] = []
        self.worker: threading.Thread | None = None
        self.size_counts = [0] * (len(SIZE_BUCKETS) + 1)
        self.items = 0
        self.running = 0  # items of the batch being run

    def held(self) -> int:
        """Items queued here or in the batch being run."""
        return len(self.queue) + self.running

    def submit(self, item: Item) -> Result:
        return self.submit_future(item).result()

    def submit_future(self, item: Item) -> Future:
        """Without blocking: for an async caller, which awaits the future on its event loop."""
        future: Future = Future()
        with self.cond:
            if self.worker is None:
                self.worker = threading.Thread(target=self._loop, name=f"batch-{self.name}", daemon=True)
                self.worker.start()
            self.queue.append((item, future))
            self.cond.notify_all()
        return future

    def _next_batch(self) -> list[tuple[Item, Future]]:
        """The first item, plus whatever arrives before the window closes, while more requests are on their way."""
        with self.cond:
            while not self.queue:
                self.cond.wait()
            deadline = time.monotonic() + self.settings.window_ms / 1000
            while len(self.queue) < min(self.settings.max_batch, self.expected()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            batch, self.queue[:] = self.queue[:self.settings.max_batch], self.queue[self.settings.max_batch:]
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            self._count(len(batch))
            try:
                self._run([item for item, _ in batch], [future for _, future in batch])
            finally:
                self.running = 0

    def _run(self, items: list[Item], futures: list[Future]) -> None:
        try:
            results = list(self.run_batch(items))
            if len(results) != len(items):
                raise RuntimeError(f"batch stage {self.name} returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            if len(items) == 1:
                futures[0].set_exception(exc)
            else:  # one bad item must not fail the others: each alone, with its own error
                for item, future in zip(items, futures):
                    self._run([item], [future])
            return
        for future, result in zip(futures, results):
            future.set_result(result)

    def _count(self, size: int) -> None:
        with self.cond:
            self.items += size
            self.size_counts[next((i for i, b in enumerate(SIZE_BUCKETS) if size <= b), len(SIZE_BUCKETS))] += 1

    def metric_lines(self) -> list[str]:
        """Prometheus histogram lines of this stage's batch sizes."""
        with self.cond:
            counts, items = list(self.size_counts), self.items
        lines, total = [], 0
        for bound, count in zip([*map(str, SIZE_BUCKETS), "+Inf"], counts):
            total += count
            lines.append(f'clip_hpc_batch_size_bucket{{stage="{self.name}",le="{bound}"}} {total}')
        return lines + [f'clip_hpc_batch_size_sum{{stage="{self.name}"}} {items}',
                        f'clip_hpc_batch_size_count{{stage="{self.name}"}} {total}']


def shares_batches(diversity: float, path_prefix: str | None, caption: str | None) -> bool:
    """Whether a search may join a shared FAISS batch (and a text the fused text-search stage): filtered or
    diversified searches need a selector or MMR of their own, so they run alone."""
    return not (diversity or path_prefix or caption)


class BatchedSearch:
    """The app's searches: plain queries (no path prefix, caption filter or diversity) share one FAISS call per batch,
    on the compute thread; filtered or diversified ones (and all of them without batching) run alone in their own
    request thread, so they hold nobody up. A plain text query that misses the text cache is encoded and searched in
    one call (`search_text`): no hop back to the request threads between the two (3 ms of a 50 ms round of 8)."""

    def __init__(self, engine: SearchEngine, settings: BatchSettings | None, compute: ComputeThread,
                 in_flight: InFlight) -> None:
        self.engine, self.compute = engine, compute
        self.stage = in_flight.stage("search", self._run, settings) if settings is not None else None
        self.text_stage = in_flight.stage("text-search", self._run_text, settings) if settings is not None else None

    def search_text(self, text: str, k: int = 10, *, min_score: float | None = None) -> tuple[np.ndarray, list[Hit]]:
        """(query vector, hits) for a text alone: what `query_vector(text=text)` then `search_combined` give."""
        if self.fuses(text):
            return self.search_text_future(text, k, min_score=min_score).result()
        query = self.engine.query_vector(text=text)
        return query, self.search_combined(query, k, min_score=min_score)

    def fuses(self, text: str) -> bool:
        """Whether this text goes through the fused stage: batching on, and not in the text cache."""
        encoder: SharedEncoder = self.engine.encoder  # type: ignore[assignment]  (create_app checks it)
        return self.text_stage is not None and bool(text.strip()) and not encoder.is_cached(text)

    def search_text_future(self, text: str, k: int = 10, *, min_score: float | None = None) -> Future:
        """`search_text`'s answer as a future, for a text that `fuses`: the GET route awaits it on the event loop
        instead of blocking a threadpool thread (two thread hops a request; ~1 ms off the 8-client p50, measured)."""
        assert self.text_stage is not None
        return self.text_stage.submit_future((text, k, min_score))

    def search_combined(self, query: np.ndarray, k: int = 10, *, min_score: float | None = None,
                        diversity: float = 0.0, path_prefix: str | None = None,
                        caption: str | None = None) -> list[Hit]:
        if self.stage is None or not shares_batches(diversity, path_prefix, caption):
            return self.compute.search_here(self.engine.search_combined, query, k, min_score=min_score,
                                            diversity=diversity, path_prefix=path_prefix, caption=caption)
        return self.stage.submit((np.asarray(query, dtype=np.float32), k, min_score))

    def _run(self, items: list[tuple[np.ndarray, int, float | None]]) -> list[list[Hit]]:
        return self.compute.run(self.engine.search_batch, np.stack([query for query, _, _ in items]),
                                [k for _, k, _ in items], [min_score for _, _, min_score in items])

    def _run_text(self, items: list[tuple[str, int, float | None]]) -> list[tuple[np.ndarray, list[Hit]]]:
        texts = [text for text, _, _ in items]
        vectors, queries, hits = self.compute.run(self._encode_and_search, texts, [k for _, k, _ in items],
                                                  [min_score for _, _, min_score in items])
        self.engine.encoder.remember(texts, vectors)
        return list(zip(queries, hits))

    def _encode_and_search(self, texts: list[str], ks: list[int],
                           min_scores: list[float | None]) -> tuple[np.ndarray, np.ndarray, list[list[Hit]]]:
        vectors = np.asarray(self.engine.encoder.inner.encode_text(texts), dtype=np.float32)
        queries = np.stack([combine_parts({"text": vector}, {}) for vector in vectors])
        return vectors, queries, self.engine.search_batch(queries, ks, min_scores)


def batch_metric_lines(stages: Sequence[MicroBatcher | None]) -> list[str]:
    lines = ["# HELP clip_hpc_batch_size Items per micro-batch, by stage.", "# TYPE clip_hpc_batch_size histogram"]
    for stage in stages:
        if stage is not None:
            lines += stage.metric_lines()
    return lines
