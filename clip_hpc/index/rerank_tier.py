"""The re-rank tier: a 4-bit scalar-quantized copy of every vector (d/2 bytes, 256 at d=512) held in RAM between
the IVF codes and the exact float16 rows of vectors.npy. On data where the 32-byte codes rank text-like queries
badly, the true top 10 hide among 10,000-50,000 candidates; re-reading that many 1 KiB rows costs ~2 µs each, while
the tier re-scores them in RAM and hands only its best 20-500 to the exact re-rank (FAISS's IndexRefine over
IndexScalarQuantizer). The self-check decides whether it pays (index.json `tier`); where it does not, it is removed.
Under a tight --max-ram the code is leaner (8-bit PQ, d/8 bytes) or there is none; `--rerank-tier SQ8` asks for d.
This is the build side; loading and refining over the tier (the query side) is in `clip_hpc.ann.tier`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clip_hpc.ann.tier import EXACT_FACTORS
from clip_hpc.errors import UserError
from clip_hpc.formats.tier_codes import create_codes, write_codes
from clip_hpc.index.choose import FLAT_BELOW, KMEANS_ITERATIONS, PQ_TRAIN_PER_CENTROID
from clip_hpc.index.memory import TIER_CODES

TIER_KEY = "SQ4"  # the default code; the RAM budget may choose another (index/memory.py)
# vectors: wherever the auto key has inverted lists; the timed self-check keeps the tier only where it pays
# (46k real CLIP vectors: the default 0.65x exact's time with it, no faster than exact without)
TIER_FROM = FLAT_BELOW
TIER_CHOICES = ("auto", "on", "off", *TIER_CODES)


def may_tier(choice: str, n: int, is_ivf: bool, refine: bool, tier_from: int = TIER_FROM) -> bool:
    """--rerank-tier auto|on|off|SQ8|SQ4|PQ: whether this index can take a tier at all (IVF, re-ranked; auto from
    `tier_from` vectors); the RAM budget then picks its code (index/memory.py), or none."""
    if choice not in TIER_CHOICES:
        raise ValueError(choice)
    return refine and is_ivf and choice != "off" and (choice != "auto" or n >= tier_from)


def check_tier_choice(choice: str, key: str, is_ivf: bool, refine: bool, refine_factor: int | None) -> None:
    """An explicit `--rerank-tier on` (or a named code) that could never be honoured is a one-line error, not a
    build without one."""
    least = min(EXACT_FACTORS) + 1  # the tier hands the exact re-rank fewer rows than it was given
    if choice in ("auto", "off"):
        return
    if not is_ivf:
        why = f"{key} has no inverted lists (the tier re-scores an IVF index's candidates); use an IVF key"
    elif not refine:
        why = "the tier feeds the exact re-rank, which --no-refine turns off"
    elif refine_factor is not None and refine_factor < least:
        why = (
            f"the tier needs --refine-factor {least} or more (it keeps {least - 1} rows a result), not {refine_factor}"
        )
    else:
        return
    raise UserError(f"--rerank-tier {choice} cannot be honoured: {why}, or leave --rerank-tier at auto")


def train_tier(sample: np.ndarray, key: str = TIER_KEY) -> faiss.Index:
    """The scalar quantizer's per-dimension ranges (or a PQ tier's codebooks), from the build's training sample
    (seconds, not minutes)."""
    tier = faiss.index_factory(sample.shape[1], key, faiss.METRIC_INNER_PRODUCT)
    inner = faiss.downcast_index(tier)  # `tier` keeps the object alive
    if isinstance(inner, faiss.IndexPQ):  # as the index's own codebooks (index/stages.py): fewer points and
        inner.pq.cp.max_points_per_centroid, inner.pq.cp.niter = PQ_TRAIN_PER_CENTROID, KMEANS_ITERATIONS
        inner.do_polysemous_training = False  # it only reorders codes for Hamming filtering, which is not used
    tier.train(np.ascontiguousarray(sample, dtype=np.float32))
    return tier


def encode_into(tier: faiss.Index, codes_path: Path, ids: np.ndarray, vectors: np.ndarray) -> None:
    """One batch of vectors into its rows of tier_codes.npy."""
    write_codes(codes_path, ids, tier.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32)))


def start_codes(tier: faiss.Index, codes_path: Path, n_rows: int) -> None:
    """An empty tier_codes.npy of one row per global id, for the ranks to fill."""
    create_codes(codes_path, n_rows, int(tier.sa_code_size()))


def tier_record(key: str, code_bytes: int, exact_factor: int, asked_on: bool, pays: bool | None) -> dict[str, Any]:
    """The `tier` record of index.json; after an explicit `--rerank-tier on` also that it was asked for (so
    `--update` keeps it) and whether the self-check would have chosen it by itself."""
    asked = {"asked": "on", "pays": bool(pays)} if asked_on else {}
    return {"key": key, "code_bytes": code_bytes, "exact_factor": exact_factor, **asked}


def tier_warning(kept: bool) -> str:
    """The line `clip-hpc index` prints when an explicit `--rerank-tier on` does not pay on this data."""
    if kept:
        return (
            "clip-hpc index: warning: --rerank-tier on: kept as asked, but the self-check found the tier does not pay "
            "on this data (the same recall costs less without it); leave --rerank-tier at auto to drop it"
        )
    return (
        "clip-hpc index: warning: --rerank-tier on: no setting with the tier reached the recall the exact re-rank "
        "alone does on this data; the index has no tier"
    )
