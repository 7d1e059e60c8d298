"""`SharedEncoder`: the server's wrapper around the engine's encoder, so that many request threads share one model.

One model call at a time (threads would only fight over the same cores or GPU) and an LRU cache of text
embeddings in front of it. It is itself an `Encoder`, handed to `SearchEngine` at construction.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
from PIL import Image

from clip_hpc.encoders import Encoder


class SharedEncoder:
    """An `Encoder` safe to call from many threads, with a text cache and its hit/miss counts."""

    def __init__(self, inner: Encoder, cache_size: int = 1024) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.model_lock = threading.Lock()
        self.cache_lock = threading.Lock()
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = cache_size
        self.counts = {"hit": 0, "miss": 0}

    @property
    def image_size(self) -> int:
        return self.inner.image_size

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
        if missing:
            with self.model_lock:
                with self.cache_lock:  # a thread that waited here may find its text computed meanwhile
                    found.update({t: self.cache[t] for t in missing if t in self.cache})
                todo = [t for t in missing if t not in found]
                vectors = np.asarray(self.inner.encode_text(todo), dtype=np.float32) if todo else []
            with self.cache_lock:
                for t, v in zip(todo, vectors):
                    v.setflags(write=False)
                    self.cache[t] = found[t] = v
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        with self.model_lock:
            return self.inner.encode_images(images)
