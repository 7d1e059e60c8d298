"""An array of embedding rows (the served vectors, memory-mapped) into a FAISS index under their global ids, a chunk at
a time (numpy in, the index out)."""

from __future__ import annotations

import faiss
import numpy as np


def add_embedded_rows(index: faiss.Index, vectors: np.ndarray, rows: int | None = None, chunk: int = 65_536) -> None:
    """Add the float32 of the first `rows` rows (all by default) to an IDMap'd `index` under their ids; all-zero
    rows (never embedded, or removed) are left out, as every index leaves them. A chunk at a time: a memory-mapped
    vectors.npy is never read whole."""
    stop = len(vectors) if rows is None else min(rows, len(vectors))
    for lo in range(0, stop, chunk):
        block = np.asarray(vectors[lo : min(lo + chunk, stop)], dtype=np.float32)
        keep = np.flatnonzero(block.any(axis=1))
        index.add_with_ids(np.ascontiguousarray(block[keep]), (keep + lo).astype(np.int64))
