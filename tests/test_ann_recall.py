"""The recall self-check's pure parts: recall@k, its lower bound, exact search, nprobe tuning, shifted queries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_hpc.ann.core import rerank
from clip_hpc.ann.ground_truth import (
    exact_top_k,
    exact_truth,
    hit_positions,
    recall_at_k,
    recall_per_query,
    tie_aware_positions,
    without_own,
)
from clip_hpc.ann.text_queries import off_distribution_groups, off_distribution_queries
from clip_hpc.index.check_queries import check_queries
from clip_hpc.index.setting_recall import family_bound
from clip_hpc.index.tuning import (
    IMAGE_TARGET,
    TARGET_RECALL,
    group_prediction_bound,
    probe_ladder,
    recall_lower_bound,
    recall_prediction_bound,
    sweep,
)
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


def test_probe_ladder_doubles_up_to_every_list():
    assert probe_ladder(16) == [1, 2, 4, 8, 16]
    assert probe_ladder(12) == [1, 2, 4, 8, 12]
    assert probe_ladder(1) == [1]


def test_hit_positions_give_the_recall_of_an_exact_rerank_of_any_prefix():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    exact = exact_top_k(queries, vectors, 10)
    candidates = np.stack([rng.permutation(3000)[:500] for _ in range(40)])  # any candidate order
    candidates[:, :3] = exact[:, :3]  # some true neighbours early, the rest wherever they fall
    candidates[0, 5:] = -1  # a short list
    positions = hit_positions(candidates, exact)
    for c in (10, 50, 200, 500, 1000):  # 1000: past the lists' end, absent ids still count as absent
        _, reranked = rerank(queries, candidates[:, :c], vectors, 10)
        assert recall_per_query(reranked, exact) == pytest.approx((positions < c).sum(axis=1) / 10)


def test_sweep_takes_the_cheapest_pair_and_stops_when_wider_probes_cost_more():
    recall = {10: lambda p: 0.90 + p / 1000, 25: lambda p: 0.93 + p / 1000, 50: lambda p: 0.93 + p / 1000}
    searched = []

    def bound_of(probe, live):
        searched.append(probe)
        return lambda f: recall[f](probe)

    out = sweep(bound_of, [1, 2, 4, 8, 16, 32, 64], [10, 25, 50], cost=lambda p, f: p + f, deadline=float("inf"))
    assert out.best == (32, 25) and not out.budget_hit  # 64+10 costs more than 32+25
    assert searched == [1, 2, 4, 8, 16, 32]  # one search per nprobe; 64 alone costs more than the best pair
    assert out.bounds[(32, 50)] == pytest.approx(0.962)
    out = sweep(lambda p, live: lambda f: 0.5, [1, 2, 4], [10, 25], cost=lambda p, f: p + f, deadline=float("inf"))
    assert out.best == (1, 10)  # none reaches the target: the best bound, then the cheapest
    out = sweep(
        lambda p, live: lambda f: {10: 0.5, 25: 0.801, 50: 0.804}[f],
        [1, 2],
        [10, 25, 50],
        cost=lambda p, f: p + f,
        deadline=float("inf"),
    )
    assert out.best == (1, 25)  # within 0.005 of the best bound and cheaper
    searched.clear()
    out = sweep(bound_of, [1, 2, 4, 8], [10], cost=lambda p, f: p + f, deadline=0.0)
    assert out.budget_hit and searched == [1, 8] and out.best == (8, 10)  # past the deadline after one nprobe,
    # nothing reached the target: the widest nprobe is priced before it stops
    searched.clear()
    out = sweep(bound_of, [1, 32, 64], [25], cost=lambda p, f: p + f, deadline=0.0)
    assert out.budget_hit and searched == [1, 64] and out.best == (64, 25)


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


def test_with_the_groups_cosines_only_the_spread_the_cosine_does_not_explain_bounds_a_fresh_direction():
    cosines = np.array([0.45, 0.40, 0.35, 0.30, 0.25] * 2)  # the self-check's schedule: two directions a cosine
    trend = 0.99 - 3.0 * (0.45 - cosines) ** 2  # recall falls with the cosine, steeper at the end, every direction
    assert recall_prediction_bound(trend) < 0.95  # read as spread between directions, it sinks the bound
    assert recall_prediction_bound(trend, cosines=cosines) == pytest.approx(trend.mean())
    noisy = trend + np.array([0.02, -0.02] * 5)  # the two directions of each cosine differ by 0.04
    spread2 = 10 * 0.02**2 / 5  # about each cosine's own mean, on 10 - 5 d.f.
    bound = recall_prediction_bound(noisy, cosines=cosines)
    assert bound == pytest.approx(noisy.mean() - 2.015 * np.sqrt(spread2 + spread2 / 10))
    assert recall_prediction_bound(noisy) < bound < noisy.mean() - 2 * np.sqrt(spread2)
    # what the group means vary by from their few sampled queries is not a direction's: only the rest counts
    loose = recall_prediction_bound(noisy, cosines=cosines, sampling_var=spread2 / 2)
    assert loose == pytest.approx(noisy.mean() - 2.015 * np.sqrt(spread2 / 2 + spread2 / 10))
    assert recall_prediction_bound(noisy, cosines=cosines, sampling_var=1.0) == pytest.approx(
        noisy.mean() - 2.015 * np.sqrt(spread2 / 10)  # never below the mean's own uncertainty
    )
    assert recall_prediction_bound(noisy, cosines=np.full(10, 0.3)) == recall_prediction_bound(noisy)  # no trend


def test_with_no_cosine_repeated_the_trend_is_a_straight_line():
    cosines = np.linspace(0.45, 0.25, 10)
    line = 0.99 - 0.3 * (0.45 - cosines)
    assert recall_prediction_bound(line, cosines=cosines) == pytest.approx(line.mean())
    noisy = line + np.array([0.01, -0.01] * 5)
    residual = noisy - np.polyval(np.polyfit(cosines, noisy, 1), cosines)
    spread2 = (residual**2).sum() / 8
    assert recall_prediction_bound(noisy, cosines=cosines) == pytest.approx(
        noisy.mean() - 1.860 * np.sqrt(spread2 + spread2 / 10)
    )


def test_a_group_bound_takes_the_sampling_variance_from_the_groups_own_queries():
    rng = np.random.default_rng(0)
    cosines = [0.45, 0.40, 0.35, 0.30, 0.25] * 2
    groups = [rng.choice([0.8, 0.9, 1.0], size=40) for _ in cosines]
    means = np.array([g.mean() for g in groups])
    noise = np.mean([g.var(ddof=1) / 40 for g in groups])
    expected = recall_prediction_bound(means, cosines=cosines, sampling_var=noise)
    assert group_prediction_bound(groups, cosines) == pytest.approx(expected)
    assert group_prediction_bound(groups, cosines) >= recall_prediction_bound(means, cosines=cosines)


def test_off_distribution_groups_use_one_direction_each():
    rng = np.random.default_rng(0)
    x, _ = synthetic.gaussian_mixture(400, 64, 5)
    groups = off_distribution_groups(x, rng, directions=8)
    assert [len(g) for g in groups] == [50] * 8
    shifts = np.stack([(g - x[i * 50 : (i + 1) * 50]).mean(axis=0) for i, g in enumerate(groups)])
    cos = (shifts @ shifts.T) / np.outer(np.linalg.norm(shifts, axis=1), np.linalg.norm(shifts, axis=1))
    assert np.all(np.abs(cos[~np.eye(8, dtype=bool)]) < 0.5)  # eight different offsets, not one


def test_sweep_prices_only_settings_cheaper_than_the_best_so_far():
    priced = {}

    def bound_of(probe, live):
        priced[probe] = list(live)
        return lambda f: 0.99 if f == 50 or probe >= 8 else 0.5

    out = sweep(bound_of, [1, 2, 4, 8, 16], [10, 25, 50], cost=lambda p, f: p + f, deadline=float("inf"))
    assert priced[1] == [10, 25, 50] and priced[2] == [10, 25]  # 1 + 50 reached the target: 2 + 50 costs more
    assert out.best == (8, 10) and 16 not in priced  # 16 + 10 costs more than 8 + 10


@pytest.mark.parametrize("n", [1, 2, 5])
def test_an_index_of_fewer_than_k_vectors_has_the_recall_of_what_exists(tmp_path, n):
    """recall@10 divided by 10 even when only n < 10 vectors exist: an exact Flat index of 5 vectors reported 0.5
    'below the 0.95 target', and one of 1 vector NaN (no report queries), written into index.json as a bare NaN
    that strict JSON parsers reject."""
    from clip_hpc.index.build import build_index
    from index_fixtures import synthetic_emb_dir

    emb, _ = synthetic_emb_dir(tmp_path / "emb", n)
    info = build_index(emb, tmp_path / "index", progress=False)

    def strict(token: str) -> None:
        raise ValueError(f"index.json holds {token}")

    recorded = json.loads((tmp_path / "index" / "index.json").read_text(), parse_constant=strict)
    assert recorded["recall"]["served"] == info.recall["served"] == 1.0 and info.recall["target_met"]
    assert recorded["recall"]["in_distribution"] == {"no_refine": 1.0, "refine": 1.0}


def test_recall_per_query_counts_only_the_neighbours_that_exist():
    exact = np.array([[3, 1, -1, -1], [2, -1, -1, -1]])
    assert recall_per_query(np.array([[1, 3, -1, -1], [2, -1, -1, -1]]), exact, 4).tolist() == [1.0, 1.0]
    assert recall_per_query(np.array([[1, 7, -1, -1], [5, -1, -1, -1]]), exact, 4).tolist() == [0.5, 0.0]


def duplicated(n: int, copies: int, dim: int = 32, seed: int = 3) -> np.ndarray:
    """n unit vectors (float16-exact) whose first `copies` rows are one vector: a placeholder image by the thousand."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors[:copies] = vectors[0]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float16).astype(np.float32)


def test_a_query_tied_at_the_kth_place_counts_any_candidate_that_scores_as_much():
    """Another copy of a duplicated vector is as right as the copy the exact search named; a query with no tie
    keeps the id positions of `hit_positions`."""
    vectors = duplicated(200, 40)
    queries = vectors[[0, 150]]
    truth = exact_truth(queries, vectors, 10)
    assert truth.tied.tolist() == [True, False]
    named = set(truth.ids[0].tolist())
    others = [i for i in range(39, -1, -1) if i not in named]  # copies the exact search did not name, first
    found = np.array([[*(others[:12]), *range(100, 138)], exact_top_k(queries[1:], vectors, 50)[0]])
    positions = tie_aware_positions(found, truth, queries, vectors)
    assert positions[0].tolist() == list(range(10))  # the first ten candidates are all copies
    np.testing.assert_array_equal(positions[1], hit_positions(found, truth.ids)[1])
    by_id = hit_positions(found, truth.ids)[0]
    assert (by_id < 10).sum() < 10  # by ids alone, the same list would have missed some


@pytest.mark.parametrize("key", ["Flat", "IVF8,Flat"])
def test_duplicated_vectors_do_not_lower_the_self_checks_recall(tmp_path, key):
    """300 copies of one vector among 1,000: counted by ids, both indexes reported in-distribution recall far
    below the target (the exact one too) for returning other copies than the exact search named."""
    from clip_hpc.devdata import synthetic_vectors
    from clip_hpc.index.build import build_index

    vectors = duplicated(1000, 300)
    synthetic_vectors.write_emb_dir(tmp_path / "emb", vectors, np.zeros(len(vectors), dtype=np.int64), 250)
    info = build_index(tmp_path / "emb", tmp_path / "index", index_key=key, progress=False)
    assert info.recall["in_distribution"]["refine"] == 1.0 and info.recall["target_met"]


def test_an_indexed_vector_asked_as_a_query_is_scored_on_the_others_not_on_itself():
    """The self-check's image queries are indexed vectors; finding itself is free, so a held-out image got 0.975
    where the self-check claimed 0.986. Its own id is left out of the truth and of what the index returns."""
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((200, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries, own = vectors[[3, 10, 50]], np.array([3, -1, 50])
    truth = exact_truth(queries, vectors, 5, own=own)
    plain = exact_top_k(queries, vectors, 6)
    assert plain[0, 0] == 3 and truth.ids[0].tolist() == plain[0, 1:6].tolist()  # the next five, itself left out
    assert truth.ids[1].tolist() == plain[1, :5].tolist()  # no own id (-1): as before
    assert 50 not in truth.ids[2]
    assert without_own(np.array([[3, 7, 9], [10, 3, 4]]), np.array([3, -1])).tolist() == [[7, 9, -1], [10, 3, 4]]
    assert without_own(np.array([[1, 2]]), None).tolist() == [[1, 2]]


def test_the_self_checks_image_queries_carry_their_own_ids_and_their_truth_leaves_them_out():
    vectors, _ = synthetic.gaussian_mixture(2000, 16, 10, latent=4, seed=2)
    ids = np.random.default_rng(1).choice(2000, 100, replace=False)
    tune, report = check_queries(vectors, ids, np.random.default_rng(2), None)
    for half, expected in ((tune, np.sort(ids[0::2])), (report, np.sort(ids[1::2]))):
        (start, stop), *_ = half.spans["in_distribution"]
        assert half.own[start:stop].tolist() == expected.tolist() and (half.own[stop:] == -1).all()
        assert not (half.truth.ids[start:stop] == expected[:, None]).any()  # never its own neighbour


def test_image_queries_must_reach_099_and_text_like_ones_095():
    vectors, _ = synthetic.gaussian_mixture(2000, 16, 10, latent=4, seed=2)
    tune, _ = check_queries(
        vectors, np.random.default_rng(1).choice(2000, 200, replace=False), np.random.default_rng(2), None
    )
    (start, stop), *_ = tune.spans["in_distribution"]
    per_query = np.ones(len(tune.queries))
    assert family_bound(per_query, tune) == 1.0 - (IMAGE_TARGET - TARGET_RECALL)  # image queries count against 0.99
    per_query[start:stop] = 0.97  # every image query 0.97: above 0.95, below 0.99
    assert family_bound(per_query, tune) < TARGET_RECALL
    per_query[start:stop], per_query[stop:] = 1.0, 0.97  # text-like 0.97: above their 0.95
    assert family_bound(per_query, tune) >= TARGET_RECALL
