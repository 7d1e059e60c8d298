"""The generic micro-batcher: items submitted from many threads are gathered for at most a few milliseconds (or up to
a batch size) and run as one call, because on a CPU a batch of 8 texts costs little more than one (the weights are
read once), and FAISS answers several queries in one pass.

A stage (`MicroBatcher`) runs on its own thread. It waits for more items only while `expected()` says more are on
their way (in the server: `in_flight.InFlight`), so a lone caller never waits for a window. A batch that fails is
re-run item by item, so one bad item gets its own error and the others their results.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from clip_hpc.errors import UserError
from clip_hpc.server.batch_defaults import BATCH_WINDOW_MS, MAX_BATCH
from clip_hpc.server.metrics import BatchSizes

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchSettings:
    """`window_ms`: the longest a batch waits for more requests; `max_batch`: the most items in one call."""

    window_ms: float = BATCH_WINDOW_MS
    max_batch: int = MAX_BATCH

    def __post_init__(self) -> None:
        if not (0 <= self.window_ms <= 10_000 and self.max_batch >= 1):
            raise UserError("--batch-window-ms must be between 0 and 10000 and --max-batch at least 1")


DEFAULT_BATCHING = BatchSettings()  # frozen: one shared default instance is safe


class MicroBatcher(Generic[Item, Result]):
    """`submit(item)` from any thread blocks until `run_batch([..., item, ...])` has produced that item's result."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        settings: BatchSettings,
        expected: Callable[[], int] = lambda: 0,
    ) -> None:
        self.name, self.run_batch, self.settings, self.expected = name, run_batch, settings, expected
        self.cond = threading.Condition()
        self.queue: list[tuple[Item, Future]] = []
        self.worker: threading.Thread | None = None
        self.sizes = BatchSizes(name)
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

    def metric_lines(self) -> list[str]:
        """Prometheus histogram lines of this stage's batch sizes."""
        return self.sizes.lines()

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
            batch, self.queue[:] = self.queue[: self.settings.max_batch], self.queue[self.settings.max_batch :]
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            self.sizes.observe(len(batch))
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
