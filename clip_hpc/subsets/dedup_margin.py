"""How wide a border `clip-hpc dedup --border auto` gives its partitions: what the data's own pairs need, measured on
the k-means sample, rather than the worst case (pure: numpy in, numpy out).

The exact margin m = sqrt(2 - 2S) assumes a pair's two ends lie apart exactly along the line between two centroids.
Real CLIP pairs never do: on 47k real photos (Chinese-CLIP ViT-B-16, S = 0.95) the pairs split by a border needed at
most 0.23 m, while m itself put every vector in 127 partitions (docs/subsets.md, "The border"). So the sample's most
similar pairs are found exactly, each split pair's need is taken (`required_margins`), and the margin is twice the
largest, never more than m.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from clip_hpc.subsets.dedup_core import BLOCK_FLOATS, block_pairs, border_margin, similarity_blocks

CALIBRATION_ROWS = 20_000  # sample rows whose pairs are searched exactly: 2e8 products
CALIBRATION_PAIRS = 1_000  # at least this many pairs: below the threshold too, when the rows hold fewer above it
PAIRS_PER_ROW = 32  # a row's first partners whose needs are taken: a group of near-copies has millions of pairs
CALIBRATION_SAFETY = 2.0  # the margin over the largest need seen (on real photos the largest of all pairs was 1.75x)


class Calibration(NamedTuple):
    """The margin chosen, the sample pairs it rests on, and their least cosine (the threshold, or lower when the
    rows held fewer than `CALIBRATION_PAIRS` pairs above it: those pairs lie further apart, so need more)."""

    margin: float
    pairs: int
    floor: float


def nearest_centroids(rows: np.ndarray, centroids: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Each row's nearest centroid, `chunk` rows at a time (a (rows, k) matrix at a billion vectors' k is GBs)."""
    return np.concatenate([np.argmax(rows[lo : lo + chunk] @ centroids.T, axis=1) for lo in range(0, len(rows), chunk)])


def required_margins(
    rows: np.ndarray, nearest: np.ndarray, centroids: np.ndarray, left: np.ndarray, right: np.ndarray
) -> np.ndarray:
    """Per pair (rows `left[p]`, `right[p]`; `nearest`: each row's nearest centroid): the least margin at which the
    pair meets in the nearest partition of one end; 0 when both ends have the same nearest. Row y (nearest b) joins
    a when <y, b - a> <= margin |a - b| (`assign_partitions`), so y needs <y, b - a> / |a - b|."""
    a, b = nearest[left], nearest[right]
    towards = centroids[b] - centroids[a]
    spacing = np.linalg.norm(towards, axis=1)
    split = (a != b) & (spacing > 0)  # two equal centroids (k-means on degenerate data): a row joins both at once
    spacing[~split] = 1.0
    right_needs = np.einsum("ij,ij->i", rows[right], towards) / spacing
    left_needs = -np.einsum("ij,ij->i", rows[left], towards) / spacing
    return np.where(split, np.minimum(left_needs, right_needs), 0.0)


def pair_floor(rows: np.ndarray, threshold: float, least: int, block_floats: int = BLOCK_FLOATS) -> float:
    """The threshold, or the cosine of the `least`-th most similar pair of `rows` when that is lower."""
    top = np.empty(0, np.float32)
    for _, block in similarity_blocks(rows, len(rows), block_floats):
        values = block[block > (top.min() if len(top) >= least else -np.inf)]  # -inf: a pair's other order
        top = np.concatenate([top, values])
        if len(top) > least:
            top = np.partition(top, len(top) - least)[-least:]
    return float(min(threshold, top.min())) if len(top) else threshold


def calibrated_margins(
    rows: np.ndarray, centroid_sets: list[np.ndarray], threshold: float, block_floats: int = BLOCK_FLOATS
) -> list[Calibration]:
    """For each set of centroids, the margin the pairs of the first `CALIBRATION_ROWS` unit `rows` (a uniform
    sample) need (each row's first `PAIRS_PER_ROW`), times `CALIBRATION_SAFETY`, at most `border_margin(threshold)`;
    that margin itself when the rows hold fewer than `CALIBRATION_PAIRS` pairs in all (too few to say). One search
    of the rows' pairs serves every set."""
    exact = border_margin(threshold)
    rows = rows[:CALIBRATION_ROWS]
    floor = pair_floor(rows, threshold, CALIBRATION_PAIRS, block_floats)
    nearest = [nearest_centroids(rows, centroids) for centroids in centroid_sets]
    worst, count = np.zeros(len(centroid_sets)), 0
    for left, right, _ in block_pairs(rows, len(rows), floor, block_floats):
        count += len(left)
        left, right = first_partners(left, right, PAIRS_PER_ROW)
        for s, centroids in enumerate(centroid_sets):
            worst[s] = max(worst[s], largest_need(rows, nearest[s], centroids, left, right, block_floats))
    if count < CALIBRATION_PAIRS:
        return [Calibration(exact, count, floor) for _ in centroid_sets]
    return [Calibration(min(exact, CALIBRATION_SAFETY * float(w)), count, floor) for w in worst]


def first_partners(left: np.ndarray, right: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs less all but the first `most` of each left row (`left` ascending, as `block_pairs` gives it):
    ordinary rows have a few partners and keep them all; 16,000 near-copies in the rows had 128 M pairs, and taking
    the need of each cost minutes (the margin they set is the same from 32 of each)."""
    rank = np.arange(len(left)) - np.searchsorted(left, left)
    keep = rank < most
    return left[keep], right[keep]


def largest_need(
    rows: np.ndarray, nearest: np.ndarray, centroids: np.ndarray, left: np.ndarray, right: np.ndarray, floats: int
) -> float:
    """The largest `required_margins` of the pairs whose ends have different nearest centroids (0 if none), in
    chunks of `floats` // dim pairs: each pair takes three dim-long rows, so a block's millions of pairs at a low
    threshold were GBs at once (20k rows, S = 0.01, dim 128: 4.3 GB)."""
    split = np.flatnonzero(nearest[left] != nearest[right])
    step = max(1, floats // max(1, rows.shape[1]))
    worst = 0.0
    for lo in range(0, len(split), step):
        part = split[lo : lo + step]
        worst = max(worst, float(required_margins(rows, nearest, centroids, left[part], right[part]).max()))
    return worst
