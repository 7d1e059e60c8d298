"""The recall self-check's pure parts: recall@k, its lower bound, exact search, nprobe tuning, shifted queries."""
from __future__ import annotations

import numpy as np
import pytest

from clip_hpc.index.selfcheck import (exact_top_k, off_distribution_groups, off_distribution_queries, recall_at_k,
                             recall_lower_bound, recall_prediction_bound, tune_jointly, tune_nprobe)
from index_fixtures import synthetic


def test_recall_at_k():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[1, 2, 9, 9], [8, 7, 6, 5]])
    assert recall_at_k(approx, exact, 4) == pytest.approx((0.5 + 1.0) / 2)
    assert recall_at_k(np.full((2, 4), -1), exact, 4) == 0.0


def test_recall_lower_bound_is_below_the_mean_and_tightens_with_more_queries():
    few, many = np.array([1.0, 0.9, 0.8, 1.0]), np.tile([1.0, 0.9, 0.8, 1.0], 100)
    assert recall_lower_bound(few) < recall_lower_bound(many) < many.mean()
    assert recall_lower_bound(np.ones(50)) == 1.0


def test_tune_nprobe_takes_the_smallest_that_reaches_the_target():
    table = {1: 0.5, 2: 0.9, 4: 0.96, 8: 0.99, 16: 1.0}
    tried = []
    best, seen = tune_nprobe(lambda p: tried.append(p) or table[p], nlist=16)
    assert best == 4 and tried == [1, 2, 4] and seen == {1: 0.5, 2: 0.9, 4: 0.96}
    best, seen = tune_nprobe(lambda p: 0.5 + p / 100, nlist=12)
    assert best == 12 and max(seen) == 12  # never reached: the best tried, nlist included


def test_exact_top_k_matches_brute_force_and_skips_empty_rows():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 16)).astype(np.float32)
    vectors[::7] = 0  # failed ids leave zero rows
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    scores = queries @ vectors.T
    scores[:, ::7] = -np.inf
    expected = np.argsort(-scores, axis=1)[:, :10]
    np.testing.assert_array_equal(exact_top_k(queries, vectors, 10, chunk=64), expected)


def test_off_distribution_queries_are_unit_vectors_moved_away():
    rng = np.random.default_rng(0)
    x, _ = synthetic.gaussian_mixture(200, 64, 5)
    moved = off_distribution_queries(x, rng)
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1, atol=1e-5)
    cos = np.sum(moved * x, axis=1)
    assert 0.3 < cos.mean() < 0.9


def test_prediction_bound_is_set_by_the_spread_between_groups():
    steady, spread = np.array([0.97] * 8), np.array([0.99, 0.95, 0.99, 0.95, 0.99, 0.95, 0.99, 0.95])
    assert recall_prediction_bound(steady) == pytest.approx(0.97)
    assert recall_prediction_bound(spread) < 0.95 < spread.mean()  # a fresh direction may land below the target


def test_off_distribution_groups_use_one_direction_each():
    rng = np.random.default_rng(0)
    x, _ = synthetic.gaussian_mixture(400, 64, 5)
    groups = off_distribution_groups(x, rng, directions=8)
    assert [len(g) for g in groups] == [50] * 8
    shifts = np.stack([(g - x[i * 50:(i + 1) * 50]).mean(axis=0) for i, g in enumerate(groups)])
    cos = (shifts @ shifts.T) / np.outer(np.linalg.norm(shifts, axis=1), np.linalg.norm(shifts, axis=1))
    assert np.all(np.abs(cos[~np.eye(8, dtype=bool)]) < 0.5)  # eight different offsets, not one


def test_tune_jointly_takes_the_cheapest_pair_and_skips_dearer_searches():
    recall = {10: lambda p: 0.90 + p / 1000, 25: lambda p: 0.93 + p / 1000, 50: lambda p: 0.93 + p / 1000}
    tried = []

    def measure(p, f):
        tried.append((p, f))
        return recall[f](p)

    best, seen = tune_jointly(measure, [10, 25, 50], 64, cost=lambda p, f: p + f)
    assert best == (32, 25)  # 64+10 and 32+50 cost more
    assert all(p + f < 32 + 25 for p, f in tried if f == 50)  # never searched past the best cost
    assert seen[(64, 10)] == pytest.approx(0.964)
    tried.clear()
    best, _ = tune_jointly(measure, [10, 25], 4, cost=lambda p, f: p + f)
    assert best == (4, 25) and tried == [(4, 10), (4, 25)]  # none reaches the target at its widest nprobe: no
    # narrower one is tried, and the best recall wins
    best, _ = tune_jointly(lambda p, f: 0.5, [10, 25], 4, cost=lambda p, f: p + f)
    assert best == (4, 10)  # ties in recall: the cheapest
