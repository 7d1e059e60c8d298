"""`ServingRuntime`: what every part of a serving process shares, made once by `serve.load_engine` and handed
explicitly to the shared encoder, the batched search and the app: the one compute thread (compute.py), the
in-flight count that tells the micro-batch stages whether to wait, and the batch settings (None: batching off)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from clip_hpc.server.compute import ComputeThread
from clip_hpc.server.in_flight import InFlight
from clip_hpc.server.metrics import BatchSizes
from clip_hpc.server.micro_batch import DEFAULT_BATCHING, BatchSettings, Item, MicroBatcher, Result


@dataclass(frozen=True)
class ServingRuntime:
    """Build it with `start`: the only place a serving compute thread (which sets this job's thread counts on
    itself) is made, so no part of the server starts one behind the caller's back."""

    compute: ComputeThread
    batching: BatchSettings | None
    in_flight: InFlight = field(default_factory=InFlight)

    @classmethod
    def start(cls, batching: BatchSettings | None = DEFAULT_BATCHING) -> ServingRuntime:
        return cls(ComputeThread(), batching)

    def stage(
        self, name: str, run_batch: Callable[[list[Item]], Sequence[Result]]
    ) -> MicroBatcher[Item, Result] | None:
        """A micro-batch stage that waits for the requests in flight, or None with batching off (callers then
        run each request's call alone)."""
        return None if self.batching is None else self.in_flight.stage(name, run_batch, self.batching)

    def batch_sizes(self) -> list[BatchSizes]:
        """Every stage's batch-size histogram, in the order the stages were made (for /metrics)."""
        return [stage.sizes for stage in self.in_flight.stages]
