"""The re-rank tier (index/rerank_tier.py, formats/tier_codes.py): codes written by separate writers, the served
search (codes -> tier -> exact rows), and the self-check's account of it matching what is served, query by query."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_hpc.ann.core import normalise_rows, rerank, set_nprobe
from clip_hpc.ann.ground_truth import exact_top_k, hit_positions
from clip_hpc.ann.text_queries import text_like_groups
from clip_hpc.ann.tier import MIN_PART, TierScorer, load_tier
from clip_hpc.bench.heldout import VectorQueriesOnly, heldout_mixture_params
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.formats.tier_codes import copy_codes, create_codes, write_codes
from clip_hpc.index.build import build_index
from clip_hpc.index.tier_recall import tier_ranks, tier_scores
from clip_hpc.index.update import update_index
from clip_hpc.search.engine import SearchEngine
from index_fixtures import synthetic

N, DIM = 60_000, 64


def test_codes_from_separate_writers_land_in_their_own_rows(tmp_path):
    path = tmp_path / "codes.npy"
    create_codes(path, 100, 4)
    rng = np.random.default_rng(0)
    first, second = np.r_[0:10, 12:30], np.r_[30:55, 57:100]  # two "ranks", each with failed ids (gaps)
    codes = {tuple(ids): rng.integers(1, 255, (len(ids), 4), dtype=np.uint8) for ids in (first, second)}
    for ids in (second, first):
        write_codes(path, ids, codes[tuple(ids)])
    got = np.load(path)
    for ids in (first, second):
        np.testing.assert_array_equal(got[ids], codes[tuple(ids)])
    assert not got[[10, 11, 55, 56]].any()  # rows nobody wrote stay zero
    longer = tmp_path / "longer.npy"
    create_codes(longer, 120, 4)
    copy_codes(path, longer)
    np.testing.assert_array_equal(np.load(longer)[:100], got)
    assert not np.load(longer)[100:].any()
    with pytest.raises(ValueError):
        write_codes(path, np.arange(3), np.zeros((3, 5), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    """A hard small mixture (many small low-rank clusters) indexed with the tier, and text-like queries."""
    root = tmp_path_factory.mktemp("tier")
    p = heldout_mixture_params(N, 1)
    vectors, labels = synthetic.gaussian_mixture(
        N, DIM, p.clusters, latent=p.latent, spread=p.spread, noise=p.noise, seed=11
    )
    synthetic.write_emb_dir(root / "emb", vectors, labels, 10_000, failed_every=97)
    info = build_index(root / "emb", root / "index", progress=False, rerank_tier="on")
    rows = np.asarray(IndexDir(root / "index").open_vectors(), dtype=np.float32)
    rng = np.random.default_rng(99)
    images = normalise_rows(rows[rng.choice(np.flatnonzero(rows.any(axis=1)), 200, replace=False)])
    queries = np.concatenate([q for _, q in text_like_groups(images, rng, 4)])
    return root, info, rows, queries


def test_the_tier_is_kept_recorded_and_counted_in_the_files(tiered):
    root, info, rows, _ = tiered
    files = IndexDir(root / "index")
    assert info.tier is not None and info.tier["key"] == "SQ4" and info.tier["code_bytes"] == DIM // 2
    assert info.tier["exact_factor"] < info.refine_factor  # it hands the exact re-rank fewer rows than it got
    assert files.has_tier() and {"tier.faiss", "tier_codes.npy"} <= set(info.files)
    codes = np.load(files.tier_codes_path)
    assert codes.shape == (len(rows), DIM // 2)
    assert not codes[~rows.any(axis=1)].any() and codes[rows.any(axis=1)].any(axis=1).all()
    on_disk = json.loads(files.info_path.read_text())
    assert on_disk["recall"]["tier_exact_factor"] == info.tier["exact_factor"]


def test_served_search_is_codes_then_tier_then_exact_rows(tiered):
    root, info, rows, queries = tiered
    engine = SearchEngine(root / "index", encoder=VectorQueriesOnly(DIM))
    try:
        served = np.array([[h.id for h in hits] for hits in engine.search_vectors(queries, 10)])
        index, tier = engine.index, load_tier(engine.index_dir / "tier.faiss", engine.index_dir / "tier_codes.npy")
        n_cand, n_exact = 10 * engine.refine_factor, 10 * engine.exact_factor
        set_nprobe(index, engine.nprobe)
        _, cand = index.search(queries, n_cand)
        decoded = tier.sa_decode(
            np.load(engine.index_dir / "tier_codes.npy")[np.maximum(cand, 0)].reshape(-1, DIM // 2)
        ).reshape(len(queries), n_cand, DIM)
        tier_score = np.where(cand >= 0, np.einsum("qcd,qd->qc", decoded, queries), -np.inf)
        best = np.take_along_axis(cand, np.argsort(-tier_score, axis=1, kind="stable")[:, :n_exact], 1)
        _, by_hand = rerank(queries, best, rows, 10)
        agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(served, by_hand)])
        assert agree >= 0.99  # ties in the tier's 4-bit scores may order a boundary candidate differently
        exact = exact_top_k(queries, rows, 10)
        served_recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(served, exact)])
        assert served_recall >= 0.9
    finally:
        engine.close()


def test_the_self_checks_account_of_the_tier_is_what_is_served(tiered):
    """Recall from hit positions and tier ranks (no row read) equals the engine's served recall, query by query."""
    root, info, rows, queries = tiered
    engine = SearchEngine(root / "index", encoder=VectorQueriesOnly(DIM))
    try:
        exact = exact_top_k(queries, rows, 10)
        served = np.array([[h.id for h in hits] for hits in engine.search_vectors(queries, 10)])
        per_query = np.array([len(set(a) & set(e)) / 10 for a, e in zip(served, exact)])
        n_cand = 10 * engine.refine_factor
        tier = load_tier(engine.index_dir / "tier.faiss", engine.index_dir / "tier_codes.npy")
        set_nprobe(engine.index, engine.nprobe)
        _, found = engine.index.search(queries, n_cand)
        pos = hit_positions(found, exact)
        ranks = tier_ranks(found, tier_scores(engine.index, tier, queries, found), pos, [n_cand])[0]
        predicted = ((pos < n_cand) & (ranks < 10 * engine.exact_factor)).sum(axis=1) / 10
        assert np.mean(np.abs(predicted - per_query)) <= 0.005 and abs(predicted.mean() - per_query.mean()) <= 0.005
    finally:
        engine.close()


def test_update_encodes_the_new_rows_of_the_tier(tiered, tmp_path):
    root, info, rows, _ = tiered
    p = heldout_mixture_params(N, 1)
    more, labels = synthetic.gaussian_mixture(
        5_000, DIM, p.clusters, latent=p.latent, spread=p.spread, noise=p.noise, seed=12
    )
    import shutil

    shutil.copytree(root / "emb", tmp_path / "emb")
    shutil.copytree(root / "index", tmp_path / "index")
    synthetic.write_emb_dir(tmp_path / "emb", more, labels, 10_000, first_id=N)
    updated = update_index(tmp_path / "emb", tmp_path / "index", progress=False)
    assert updated.n == info.n + 5_000
    codes = np.load(IndexDir(tmp_path / "index").tier_codes_path) if updated.tier else None
    if codes is not None:
        np.testing.assert_array_equal(codes[:N], np.load(IndexDir(root / "index").tier_codes_path))
        assert codes[N:].any(axis=1).all()
    assert IndexDir(tmp_path / "index").has_tier() == bool(updated.tier)


def test_a_search_time_refine_factor_overrides_the_recorded_one(tiered):
    root, info, rows, queries = tiered
    engine = SearchEngine(root / "index", encoder=VectorQueriesOnly(DIM), refine_factor=info.tier["exact_factor"] + 1)
    try:
        assert engine.refine_factor == info.tier["exact_factor"] + 1 != info.refine_factor
        assert len(engine.search_vectors(queries[:3], 10)[0]) == 10
    finally:
        engine.close()
    from clip_hpc.errors import UserError

    with pytest.raises(UserError, match="refine-factor"):
        SearchEngine(root / "index", encoder=VectorQueriesOnly(DIM), refine_factor=0)


def test_the_scorer_keeps_the_tiers_best_on_any_number_of_threads(tiered):
    """TierScorer's pick is the brute-force top of the decoded codes, the same on one thread and on several (a
    query's candidates cut into parts), with -1 padding ignored and short rows padded with -1."""
    root, _, rows, queries = tiered
    files = IndexDir(root / "index")
    codes = np.load(files.tier_codes_path)
    rng = np.random.default_rng(5)
    cand = np.stack([rng.choice(len(rows), 3 * MIN_PART, replace=False) for _ in range(4)])
    cand[1, 100:] = -1  # a short row
    one = TierScorer.load(files.tier_path, files.tier_codes_path, 1)
    three = TierScorer.load(files.tier_path, files.tier_codes_path, 3)
    try:
        assert three.parts_for(3 * MIN_PART) == 3 and one.parts_for(3 * MIN_PART) == 1
        got_one, got_three = one.best(queries[:4], cand, 50), three.best(queries[:4], cand, 50)
    finally:
        three.close()
    np.testing.assert_array_equal(got_one, got_three)
    assert (got_one[1, :50] >= 0).all() and set(got_one[1]) <= set(cand[1, :100])
    short = one.best(queries[:1], cand[1:2, :30], 50)
    assert (short[0, :30] >= 0).all() and (short[0, 30:] == -1).all()
    decoded = one.trained.sa_decode(codes[np.maximum(cand, 0)].reshape(-1, DIM // 2)).reshape(*cand.shape, DIM)
    score = np.where(cand >= 0, np.einsum("qcd,qd->qc", decoded, queries[:4]), -np.inf)
    for i in range(4):
        top = set(cand[i][np.argsort(-score[i], kind="stable")[:50]])
        assert len(top & set(got_one[i])) >= 49  # a boundary tie in 4-bit scores may go either way


def test_a_micro_batch_of_mixed_k_is_one_tier_call_and_each_row_what_it_gets_alone(tiered):
    root, _, _, queries = tiered
    engine = SearchEngine(root / "index", encoder=VectorQueriesOnly(DIM))
    calls = []
    best = engine.tier.best

    def counted(*args, **kw):
        calls.append(len(args[0]))
        return best(*args, **kw)

    try:
        engine.tier.best = counted
        ks = [10, 3, 25, 10, 1, 3]
        batched = engine.search_batch(queries[: len(ks)], ks)
        assert calls == [len(ks)]
        for i, k in enumerate(ks):
            alone = engine.search_vectors(queries[i], k)[0]
            assert [h.id for h in batched[i]] == [h.id for h in alone] and len(alone) == k
    finally:
        engine.close()


def test_a_pq_tier_scores_as_its_decoded_codes_do(tiered):
    """The leaner tier a tight --max-ram chooses (8-bit PQ, d/8 bytes) goes through the same scorer."""
    _, _, rows, queries = tiered
    from clip_hpc.index.rerank_tier import train_tier

    sample = rows[rows.any(axis=1)][:5_000]
    trained = train_tier(sample, f"PQ{DIM // 8}")
    codes = trained.sa_encode(rows)
    scorer = TierScorer(trained, codes, 2)
    cand = np.random.default_rng(6).choice(len(rows), (2, 2 * MIN_PART), replace=False)
    try:
        got = scorer.best(queries[:2], cand, 20)
    finally:
        scorer.close()
    decoded = trained.sa_decode(codes[cand.ravel()]).reshape(*cand.shape, DIM)
    score = np.einsum("qcd,qd->qc", decoded, queries[:2])
    for i in range(2):
        assert len(set(cand[i][np.argsort(-score[i])[:20]]) & set(got[i])) >= 19
