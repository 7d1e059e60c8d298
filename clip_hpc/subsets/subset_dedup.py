"""`clip-hpc filter --dedup S`: the subset's near-duplicates dropped on rank 0 after the merge, by the same
partitions, border (`--border auto`) and exact pairs as `clip-hpc dedup`, keeping each group's lowest id (what
`dedup` keeps too)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.subsets.dedup import rows_with_ids, spherical_kmeans
from clip_hpc.subsets.dedup_core import duplicates_in, unit_rows
from clip_hpc.subsets.dedup_margin import calibrated_margins

ONE_PARTITION_UP_TO = 20_000  # rows: below, exact all-pairs in one partition costs less than training k-means
KMEANS_SAMPLE = 65_536


def partition_count(n: int) -> int:
    """About sqrt(n) partitions, as `clip-hpc dedup` starts from; one for a small subset."""
    return 1 if n <= ONE_PARTITION_UP_TO else max(2, round(math.sqrt(n)))


def units_holding(ascending_ids: np.ndarray, spans: Sequence[tuple[int, int, int]]) -> list[int]:
    """The units of `spans` (unit, lowest id, highest id) whose id range holds one of `ascending_ids`: the only
    shards the subset's vectors are read from again (a small subset of a large set reads a few, not all)."""
    return [
        unit
        for unit, lo, hi in spans
        if np.searchsorted(ascending_ids, lo) < np.searchsorted(ascending_ids, hi, side="right")
    ]


def drop_duplicates(
    results: pa.Table, emb: EmbDir, spans: Sequence[tuple[int, int, int]], dim: int, threshold: float, seed: int = 0
) -> tuple[pa.Table, int]:
    """`results` without every row whose image is a near-duplicate of a lower id in `results`; how many went.
    `spans` are the parts' (unit, lowest id, highest id), to re-read only the shards that hold the subset."""
    ids = np.asarray(results.column("id").to_numpy(), dtype=np.int64)
    if len(ids) < 2:
        return results, 0
    ascending = np.sort(ids)
    vectors, _ = rows_with_ids(emb, units_holding(ascending, spans), ascending, dim)
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), min(len(vectors), KMEANS_SAMPLE), replace=False)]
    centroids = spherical_kmeans(sample, partition_count(len(ids)), seed)
    margin = calibrated_margins(unit_rows(sample), [centroids], threshold)[0].margin if len(centroids) > 1 else 0.0
    groups = duplicates_in(vectors, ascending, centroids, threshold, margin)
    keep = ~np.isin(ids, groups.ids)
    return results.filter(pa.array(keep)), int(np.count_nonzero(~keep))
