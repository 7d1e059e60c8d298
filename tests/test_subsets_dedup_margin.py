"""`clip_hpc.subsets.dedup_margin`: the border an auto dedup gives its partitions, from the sample's own pairs."""

from __future__ import annotations

import numpy as np

from clip_hpc.devdata.near_duplicates import with_near_duplicates
from clip_hpc.subsets import dedup_core as core
from clip_hpc.subsets import dedup_margin as margin


def test_required_margins_is_what_assign_partitions_needs_to_join_the_pair():
    """Two centroids; each pair's need, found by trying margins, equals the computed one."""
    rng = np.random.default_rng(0)
    centroids = core.unit_rows(rng.standard_normal((2, 16)).astype(np.float32))
    rows = core.unit_rows(rng.standard_normal((40, 16)).astype(np.float32))
    nearest = margin.nearest_centroids(rows, centroids, chunk=7)
    assert np.array_equal(nearest, (rows @ centroids.T).argmax(axis=1))
    left, right = np.arange(0, 40, 2), np.arange(1, 40, 2)
    needs = margin.required_margins(rows, nearest, centroids, left, right)
    for p, (i, j) in enumerate(zip(left, right)):
        if nearest[i] == nearest[j]:
            assert needs[p] == 0.0
            continue
        tried = np.linspace(0.0, 2.0, 4001)
        meets = [_meet(rows[[i, j]], centroids, m) for m in tried]
        first = tried[int(np.argmax(meets))]
        assert abs(first - needs[p]) <= 1e-3 + core.ROUNDING_SLACK * 10, (p, first, needs[p])


def _meet(pair: np.ndarray, centroids: np.ndarray, m: float) -> bool:
    """Whether the two rows share a partition in which one of them is a primary, at margin m (no rounding slack)."""
    sims = pair @ centroids.T
    nearest = sims.argmax(axis=1)
    allowance = m * np.linalg.norm(centroids[0] - centroids[1])
    joins = sims[:, nearest[::-1]].diagonal()  # each row's cosine to the other's nearest centroid
    return bool(((sims.max(axis=1) - joins) <= allowance).any())


def test_pair_floor_is_the_threshold_or_lower_when_there_are_few_pairs_above_it():
    rows = core.unit_rows(np.random.default_rng(1).standard_normal((300, 8)).astype(np.float32))
    cosines = (rows @ rows.T)[np.triu_indices(300, 1)]
    tenth = float(np.sort(cosines)[-10])
    assert tenth < 0.99 and margin.pair_floor(rows, 0.99, 10, block_floats=700) == tenth  # blocks of 2-3 rows
    assert margin.pair_floor(rows, 0.5, 10) == 0.5  # more than 10 pairs above 0.5: the threshold itself
    assert margin.pair_floor(rows, -0.99, 10) == -0.99  # thousands above: the threshold itself
    assert margin.pair_floor(rows[:3], 0.9, 10) == float(np.sort((rows[:3] @ rows[:3].T)[np.triu_indices(3, 1)])[0])


def test_the_calibrated_margin_covers_twice_the_sample_pairs_needs_and_never_exceeds_the_exact_one():
    vectors, _ = with_near_duplicates(3000, 64, fraction=0.1, clusters=5, seed=3)
    rows = core.unit_rows(vectors)
    pick = np.random.default_rng(2).choice(3000, 60, replace=False)
    sets = [core.unit_rows(rows[pick[:40]]), core.unit_rows(rows[pick[40:]])]  # 40 and 20 centroids, one search
    exact = core.border_margin(0.9)
    got = margin.calibrated_margins(rows, sets, 0.9)
    assert len(got) == 2 and got[0].pairs == got[1].pairs >= margin.CALIBRATION_PAIRS and got[0].floor <= 0.9
    pairs = core.pairs_above(rows, np.arange(3000), 3000, got[0].floor)
    for centroids, border in zip(sets, got):
        nearest = margin.nearest_centroids(rows, centroids)
        worst = margin.required_margins(rows, nearest, centroids, pairs.left, pairs.right).max()
        assert border.margin == min(exact, margin.CALIBRATION_SAFETY * worst) and 0 < border.margin < exact


def test_too_few_pairs_to_say_gives_the_exact_margin():
    rows = core.unit_rows(np.random.default_rng(4).standard_normal((30, 16)).astype(np.float32))  # 435 pairs in all
    (got,) = margin.calibrated_margins(rows, [rows[:3]], 0.95)
    assert got.margin == core.border_margin(0.95) and got.pairs == 435


def test_calibration_memory_stays_within_a_few_blocks_at_a_low_threshold():
    """At S = 0.01 half of all pairs qualify; each pair's need takes three dim-long rows. Before, a block's pairs
    were all taken at once: dim times the block (here 1.5 GB; 20k rows at dim 128: 4.3 GB)."""
    import tracemalloc

    rows = core.unit_rows(np.random.default_rng(6).standard_normal((2000, 128)).astype(np.float32))
    sets = [rows[:40], rows[40:100]]
    tracemalloc.start()
    got = margin.calibrated_margins(rows, sets, 0.01)  # 2M pairs: one block of BLOCK_FLOATS
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got[0].pairs > 900_000 and max(got).margin <= core.border_margin(0.01)
    assert peak < 48 * core.BLOCK_FLOATS, f"{peak / 2**20:.0f} MiB"  # 12 blocks of float32
    small = margin.calibrated_margins(rows, sets, 0.01, block_floats=1 << 16)  # blocks of 32 rows, the same
    assert small == got


def test_first_partners_keeps_each_left_rows_first_pairs_only():
    left = np.array([0, 0, 0, 0, 2, 5, 5, 5])
    right = np.array([1, 3, 4, 9, 3, 6, 7, 8])
    kept_left, kept_right = margin.first_partners(left, right, 2)
    assert kept_left.tolist() == [0, 0, 2, 5, 5] and kept_right.tolist() == [1, 3, 3, 6, 7]
    assert margin.first_partners(left[:0], right[:0], 2)[0].size == 0


def test_two_equal_centroids_need_no_margin_and_hide_no_other_need():
    """k-means on degenerate data can return one centroid twice; a pair split between the twins needs nothing (a
    NaN there used to hide the other pairs' needs from the max)."""
    rng = np.random.default_rng(6)
    twin = core.unit_rows(rng.standard_normal((1, 8)).astype(np.float32))
    other = core.unit_rows(rng.standard_normal((1, 8)).astype(np.float32))
    centroids = np.concatenate([twin, twin, other])
    rows = core.unit_rows(rng.standard_normal((6, 8)).astype(np.float32))
    nearest = np.array([0, 1, 0, 2, 1, 2])
    needs = margin.required_margins(rows, nearest, centroids, np.array([0, 2, 4]), np.array([1, 3, 5]))
    assert np.isfinite(needs).all() and needs[0] == 0.0
    assert needs[1] == margin.required_margins(rows, nearest, centroids, np.array([2]), np.array([3]))[0] != 0.0
