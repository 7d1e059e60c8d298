"""Choosing an index for N vectors of dimension d: the factory key, the training sample's size. Pure functions:
the CLI's help, the build and the benchmarks call them without building anything."""

from __future__ import annotations

import math
import re

from clip_hpc.index.defaults import TRAIN_PER_LIST, TRAIN_PER_LIST_MAX, TRAIN_SAMPLE_TARGET

FLAT_BELOW = 10_000
ADD_BATCH = 65_536
HNSW_QUANTIZER_FROM = 65_536  # lists: from here a flat coarse quantizer's K·d per add dominates the build
PQ_TRAIN_PER_CENTROID = 64  # 8-bit PQ codebooks train on at most 256 x this many residuals (FAISS default 256)
KMEANS_ITERATIONS = 10  # coarse k-means (FAISS default 25): 5, 10 and 25 gave the same recall (500k hard, README)
OPQ_FROM = 50_000  # vectors: an 8-bit PQ (on-disk lists) gets an OPQ rotation from here
OPQ_ITERATIONS = 25  # FAISS default 50 on 65,536 points took ~8 min at d=512 on 2 cores; 20 on 16k points ranked
OPQ_TRAIN_POINTS = 16_384  # as well as 10 on 65k (held-out text-like, 100k) in a fifth of the time


def choose_index_key(n: int, dim: int, *, lists_on_disk: bool = False) -> str:
    """Flat below ~10k vectors; else IVF with K = the smallest power of two >= 2·√N (< 4·√N), an HNSW coarse
    quantizer from K = 65,536 on, and d/16 bytes of codes: fast-scan 4-bit PQ with d/8 sub-quantizers
    (PQ{d/8}x4fs) while the lists stay in memory, 8-bit PQ{d/16} under an OPQ rotation (from 50k) when they go
    to disk (fast-scan's block lists cannot be merged on disk). Measured on the 1M hard mixture (held-out
    text-like queries, every list probed): the true top 10 among the first 5,000 candidates 0.925 with
    PQ64x4fs, 0.828 with OPQ32 + PQ32; its full scan 10 ms a query instead of 39 (50,000 candidates), its
    codebooks trained in under a second instead of a minute of OPQ. Bytes at d=512: 32 B codes + 8 B id +
    the centroids 4·d·K (~45 B/vector at 1M)."""
    if n < FLAT_BELOW:
        return "Flat"
    nlist = 1 << math.ceil(math.log2(2 * math.sqrt(n)))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"
    if dim % 16 or dim < 32:
        return f"{coarse},Flat"
    if not lists_on_disk:
        return f"{coarse},PQ{dim // 8}x4fs"
    rotation = f"OPQ{dim // 16}," if n >= OPQ_FROM else ""
    return f"{rotation}{coarse},PQ{dim // 16}"


def ivf_lists(index_key: str) -> int | None:
    match = re.search(r"IVF(\d+)", index_key)
    return int(match.group(1)) if match else None


def choose_train_size(n: int, index_key: str, requested: int | None = None) -> int:
    """30·K (the contract's lower bound; IVF k-means needs no more), raised towards 64k for the PQ codebooks
    of small indexes but never past 256·K or N; 0 for Flat, which needs no training."""
    nlist = ivf_lists(index_key)
    if nlist is None:
        return 0 if index_key.strip().endswith("Flat") and "PQ" not in index_key else min(n, requested or 65_536)
    if requested:
        return min(n, int(requested))
    return min(n, max(TRAIN_PER_LIST * nlist, min(TRAIN_PER_LIST_MAX * nlist, TRAIN_SAMPLE_TARGET)))


def is_fast_scan(index_key: str) -> bool:
    """4-bit fast-scan PQ codes ("x4fs"): block-packed lists, which live in memory only."""
    return bool(re.search(r"x4fs", index_key))
