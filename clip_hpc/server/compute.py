"""`ComputeThread`: the one thread that runs the server's torch work (model load, text and image encodes) and its
batched FAISS searches.

Why one thread: torch keeps an OpenMP pool per thread that calls it. Once a second thread has called torch, libgomp
manages more threads than the job has cores and stops spinning between parallel regions, so each of the ~150
regions of a text encode pays a wake-up (ViT-B-32, 13 tokens, 2 cores: 17 ms on one thread, 28 ms once another
thread had called torch too). FAISS brings its own OpenMP; it searches with one thread while torch has the cores
(`serving_threads`), and that count is per calling thread, so every thread that searches sets it first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from clip_hpc.server.threads import use_job_cpus

T = TypeVar("T")


class ComputeThread:
    """`run(fn, ...)` runs fn on the compute thread and returns its result (or raises its error) in the caller."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="clip-hpc-compute")
        self.thread = self.executor.submit(threading.current_thread).result()
        _, self.faiss_threads = self.run(use_job_cpus, False)  # set on this thread: FAISS's count is per thread

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if threading.current_thread() is self.thread:
            return fn(*args, **kwargs)
        return self.executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Finish what was submitted, then end the thread (an in-process app's teardown; a server exits instead)."""
        self.executor.shutdown(wait=True)

    def encoder_on_gpu(self) -> None:
        """With the model on a GPU the CPU cores are FAISS's."""
        _, self.faiss_threads = self.run(use_job_cpus, True)

    def search_here(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a FAISS search in the calling (request) thread, with the serving FAISS thread count set there."""
        import faiss

        faiss.omp_set_num_threads(self.faiss_threads)
        return fn(*args, **kwargs)
