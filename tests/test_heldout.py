"""The held-out recall check (clip_hpc.bench.heldout, scripts/heldout_recall.py): its queries are what they claim
to be,
its mixtures vary, and `evaluate` scores an index against exact search. Cost: a few seconds (a 3k Flat index)."""

from __future__ import annotations

import numpy as np

from clip_hpc.ann.core import normalise_rows
from clip_hpc.bench.heldout import evaluate, heldout_mixture_params, heldout_queries
from clip_hpc.index.build import build_index
from index_fixtures import synthetic_emb_dir


def test_mixtures_vary_within_their_documented_ranges():
    drawn = [heldout_mixture_params(100_000, seed) for seed in range(1, 9)]
    assert all(
        50 <= p.clusters < 2000 and 0.55 <= p.spread <= 0.75 and p.latent in (24, 32, 48) and 0.1 <= p.noise <= 0.3
        for p in drawn
    )
    assert len({p.clusters for p in drawn}) == len(drawn) and len({p.latent for p in drawn}) > 1
    assert heldout_mixture_params(100_000, 3) == drawn[2]  # a seed names one data set


def test_text_like_queries_sit_at_their_drawn_cosine_from_an_image():
    vectors = normalise_rows(np.random.default_rng(0).standard_normal((4000, 128)).astype(np.float32))
    sets = heldout_queries(vectors, 200, seed=5, groups=4)
    assert sets["in_distribution"].shape == (200, 128) and len(sets["text_like"]) == 4
    # an in-distribution query is an indexed vector plus a little noise
    assert np.all(np.max(sets["in_distribution"] @ vectors.T, axis=1) > 0.99)
    for group, params in zip(sets["text_like"], sets["params"]):
        assert 0.25 <= params["cosine"] <= 0.45 and 0.1 <= params["noise"] <= 0.7
        best = np.max(group @ vectors.T, axis=1)  # random data: the best match is the query's own image
        assert abs(float(np.median(best)) - params["cosine"]) < 0.05
    again = heldout_queries(vectors, 200, seed=5, groups=4)
    np.testing.assert_array_equal(again["text_like"][0], sets["text_like"][0])


def test_evaluate_scores_an_exact_index_at_one(tmp_path):
    emb, _ = synthetic_emb_dir(tmp_path / "emb", 3000, dim=32)
    build_index(emb, tmp_path / "index", progress=False)  # Flat below 10k vectors: exact
    result = evaluate(tmp_path / "index", n_queries=100, groups=4)
    assert result["index_key"] == "Flat" and result["n"] == 3000
    assert result["in_distribution"] == 1.0 and result["text_like"] == 1.0
    assert len(result["groups"]) == 4 and 0.0 < result["text_like_top1_cosine"] < 0.6
    assert result["claimed"]["served"] is not None
