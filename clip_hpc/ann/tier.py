"""The re-rank tier's query side: its trained quantizer loaded with every row's codes, and FAISS's IndexRefine over
an index by it (the build side, training and encoding, is in `clip_hpc.index.rerank_tier`)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

EXACT_FACTORS = (2, 5, 10, 20, 50)  # rows per result the tier hands to the exact re-rank


def load_tier(trained_path: Path, codes_path: Path, chunk: int = 1 << 20) -> faiss.Index:
    """The trained tier with every row's codes, read into RAM (row i is global id i)."""
    tier = faiss.read_index(str(trained_path))
    codes = np.load(codes_path, mmap_mode="r")
    for lo in range(0, len(codes), chunk):
        tier.add_sa_codes(np.ascontiguousarray(codes[lo : lo + chunk]))
    return tier


def refine_over(index: faiss.Index, tier: faiss.Index) -> faiss.IndexRefine:
    """FAISS's IndexRefine of `index` by the tier. It asks both for the same ntotal, but the tier has a row per
    global id, failed ones too (more rows than the index holds vectors): the check is met for the constructor,
    then the tier's true count is put back, and the refine index takes it too: it checks each candidate id
    against its own count, and ids run up to the last row, not to the number of vectors."""
    rows = tier.ntotal
    tier.ntotal = index.ntotal
    try:
        refine = faiss.IndexRefine(index, tier)
    finally:
        tier.ntotal = rows
    refine.ntotal = rows
    return refine
