"""Just enough Prometheus text format for `GET /metrics`: request counts, a latency histogram per route, the
text-embedding cache's hits and misses (counted by the shared encoder, read here), and the micro-batch sizes per
stage (counted by each stage in a `BatchSizes`, rendered here)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Request counters and latencies, observed by the auth middleware; `cache_counts` is read at render time."""

    def __init__(
        self, index_vectors: int, cache_counts: Callable[[], Mapping[str, int]], extra: Callable[[], list[str]] = list
    ) -> None:
        self.index_vectors = index_vectors
        self.cache_counts = cache_counts
        self.extra = extra  # more metric lines, rendered last (the micro-batch sizes)
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, list[float]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, method, status)] += 1
            counts = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, bound in enumerate(LATENCY_BUCKETS):
                counts[i] += seconds <= bound
            counts[-1] += 1
            self.latency_sum[route] += seconds

    def render(self) -> str:
        cache = dict(self.cache_counts())
        with self.lock:
            lines = [
                "# HELP clip_hpc_index_vectors Vectors in the served index.",
                "# TYPE clip_hpc_index_vectors gauge",
                f"clip_hpc_index_vectors {self.index_vectors}",
                "# HELP clip_hpc_requests_total HTTP requests by route, method and status.",
                "# TYPE clip_hpc_requests_total counter",
            ]
            lines += [
                f'clip_hpc_requests_total{{route="{r}",method="{m}",status="{s}"}} {n}'
                for (r, m, s), n in sorted(self.requests.items())
            ]
            lines += ["# HELP clip_hpc_request_seconds Request latency.", "# TYPE clip_hpc_request_seconds histogram"]
            for route, counts in sorted(self.latency.items()):
                bounds = [*map(str, LATENCY_BUCKETS), "+Inf"]
                lines += [
                    f'clip_hpc_request_seconds_bucket{{route="{route}",le="{b}"}} {c}' for b, c in zip(bounds, counts)
                ]
                lines += [
                    f'clip_hpc_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}',
                    f'clip_hpc_request_seconds_count{{route="{route}"}} {counts[-1]}',
                ]
        lines += [
            "# HELP clip_hpc_text_cache_total Text embedding cache lookups.",
            "# TYPE clip_hpc_text_cache_total counter",
        ]
        lines += [f'clip_hpc_text_cache_total{{result="{k}"}} {v}' for k, v in cache.items()]
        lines += self.extra()
        return "\n".join(lines) + "\n"


class BatchSizes:
    """One micro-batch stage's batch-size histogram: observed by the stage's own thread, read by `/metrics`."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.lock = threading.Lock()
        self.bucket_counts = [0] * (len(SIZE_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.items = 0

    def observe(self, size: int) -> None:
        with self.lock:
            self.items += size
            self.bucket_counts[next((i for i, b in enumerate(SIZE_BUCKETS) if size <= b), len(SIZE_BUCKETS))] += 1

    def lines(self) -> list[str]:
        """Prometheus histogram lines of this stage's batch sizes."""
        with self.lock:
            counts, items = list(self.bucket_counts), self.items
        lines, total = [], 0
        for bound, count in zip([*map(str, SIZE_BUCKETS), "+Inf"], counts):
            total += count
            lines.append(f'clip_hpc_batch_size_bucket{{stage="{self.stage}",le="{bound}"}} {total}')
        return lines + [
            f'clip_hpc_batch_size_sum{{stage="{self.stage}"}} {items}',
            f'clip_hpc_batch_size_count{{stage="{self.stage}"}} {total}',
        ]


def batch_metric_lines(stages: Iterable[BatchSizes]) -> list[str]:
    """The batch-size histogram of every stage, under one HELP/TYPE header (also with no stage: batching off)."""
    lines = ["# HELP clip_hpc_batch_size Items per micro-batch, by stage.", "# TYPE clip_hpc_batch_size histogram"]
    for sizes in stages:
        lines += sizes.lines()
    return lines
