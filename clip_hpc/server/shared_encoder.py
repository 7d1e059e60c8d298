"""`SharedEncoder`: the server's wrapper around the engine's encoder, so that many request threads share one model.

One model call at a time, always on the server's compute thread (compute.py: threads would only fight over the same
cores or GPU, and torch slows down once several threads have called it), an LRU cache of text embeddings in front of
it, and a text being encoded for one request is waited for, not encoded again, by the others. With batching on (the
default) the texts and images that concurrent requests miss are gathered into one model call per micro-batch (see
micro_batch.py); without it each request's call runs alone (the old design, kept for `clip-hpc serve --no-batching`
and the benchmark). The compute thread and the batch settings come from the `ServingRuntime` it is given
(runtime.py). It is itself an `Encoder`, handed to `SearchEngine`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
from PIL import Image

from clip_hpc.model.encoders import Encoder
from clip_hpc.server.runtime import ServingRuntime


class SharedEncoder:
    """An `Encoder` safe to call from many threads, with a text cache and its hit/miss counts."""

    def __init__(self, inner: Encoder, runtime: ServingRuntime, cache_size: int = 1024) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.compute = runtime.compute
        self.cache_lock = threading.Lock()
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.pending: dict[str, Future] = {}  # texts some thread is encoding right now
        self.cache_size = cache_size
        self.counts = {"hit": 0, "miss": 0}
        self.text_stage = runtime.stage("text", self._encode_text_batch)
        self.image_stage = runtime.stage("image", self._encode_image_batch)

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    @property
    def text_context(self) -> str:
        return str(getattr(self.inner, "text_context", "unknown (not an open_clip model)"))

    def cache_counts(self) -> dict[str, int]:
        with self.cache_lock:
            return dict(self.counts)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        with self.cache_lock:
            found = {t: self.cache[t] for t in texts if t in self.cache}
            for t in found:
                self.cache.move_to_end(t)
            missing = list(dict.fromkeys(t for t in texts if t not in found))
            self.counts["hit"] += len(texts) - len(missing)
            self.counts["miss"] += len(missing)
            mine = [t for t in missing if t not in self.pending]
            for t in mine:
                self.pending[t] = Future()
            futures = {t: self.pending[t] for t in missing}
        if mine:
            self._encode_mine(mine)
        for t in missing:  # mine are resolved now; the others when the thread that claimed them is done
            found[t] = futures[t].result()
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def _encode_mine(self, mine: list[str]) -> None:
        """Encode the texts this thread claimed, publish them (cache + pending futures), or publish the error."""
        try:
            if self.text_stage is not None:
                vectors = self.text_stage.submit(mine)
            else:
                vectors = self.compute.run(self.model_encode_text, mine)
        except BaseException as exc:
            with self.cache_lock:
                for t in mine:
                    self.pending.pop(t).set_exception(exc)
            raise
        with self.cache_lock:
            for t, v in zip(mine, vectors):
                self.pending.pop(t).set_result(self._keep(t, v))
            self._trim()

    def is_cached(self, text: str) -> bool:
        """Without counting a hit: for a caller choosing between the cache and its own encode (`remember`)."""
        with self.cache_lock:
            return text in self.cache

    def model_encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """The model call itself, past the cache and the stages: for code already on the compute thread (the stages
        here, the fused text-search stage), which then hands the vectors to `remember`."""
        return np.asarray(self.inner.encode_text(texts), dtype=np.float32)

    def remember(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Texts the caller encoded through `model_encode_text` (the server's fused text search): cached, and
        counted as misses."""
        with self.cache_lock:
            self.counts["miss"] += len(texts)
            for t, v in zip(texts, vectors):
                self._keep(t, v)
            self._trim()

    def _keep(self, text: str, vector: np.ndarray) -> np.ndarray:
        vector.setflags(write=False)
        self.cache[text] = vector
        return vector

    def _trim(self) -> None:
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def _encode_text_batch(self, requests: list[list[str]]) -> list[np.ndarray]:
        """The text stage: every request's texts in one model call, split back per request."""
        flat = [t for texts in requests for t in texts]
        vectors = self.compute.run(self.model_encode_text, flat)
        return np.split(vectors, np.cumsum([len(texts) for texts in requests])[:-1])

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self.image_stage is not None:
            return self.image_stage.submit(list(images))
        return self.compute.run(self.inner.encode_images, images)

    def _encode_image_batch(self, requests: list[list[Image.Image]]) -> list[np.ndarray]:
        """The image stage: every request's (decoded) images in one model call, split back per request."""
        flat = [image for images in requests for image in images]
        vectors = np.asarray(self.compute.run(self.inner.encode_images, flat), dtype=np.float32)
        return np.split(vectors, np.cumsum([len(images) for images in requests])[:-1])
