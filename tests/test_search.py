"""SearchEngine and its pure core: refine, MMR, combined queries, filters and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import clip_hpc.search.engine as search_mod
from clip_hpc.ann.core import (
    RERANK_BLOCK_ROWS,
    SMALL_RERANK_ROWS,
    combine_parts,
    exact_scores,
    ivf_search,
    mmr,
    normalise_rows,
    rerank,
)
from clip_hpc.errors import UserError
from clip_hpc.formats.shard import ShardBatch
from clip_hpc.index.build import build_index
from clip_hpc.search.engine import SearchEngine
from clip_hpc.search.records import UnknownIdError
from index_fixtures import synthetic_emb_dir

N = 1200


# --- pure functions --------------------------------------------------------------------------------------------
def test_rerank_orders_candidates_by_exact_dot_product():
    vectors = np.eye(4, dtype=np.float16)
    query = np.array([[0.1, 0.7, 0.2, 0.0]], dtype=np.float32)
    scores, ids = rerank(query, np.array([[0, 1, 2, -1, 1]]), vectors, k=3)
    assert ids.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(scores, [[0.7, 0.2, 0.1]], rtol=1e-3)
    scores, ids = rerank(query, np.array([[3, -1, -1]]), vectors, k=2)
    assert ids.tolist() == [[3, -1]] and scores[0, 1] == -np.inf


@pytest.mark.parametrize("n", [1, SMALL_RERANK_ROWS, SMALL_RERANK_ROWS + 1, 3 * RERANK_BLOCK_ROWS + 5])
def test_exact_scores_are_the_float32_dot_products_of_the_stored_rows_at_any_count(n):
    rng = np.random.default_rng(n)
    rows = rng.standard_normal((n, 64)).astype(np.float16)  # numpy up to SMALL_RERANK_ROWS, torch blocks beyond
    query = rng.standard_normal(64).astype(np.float32)
    scores = exact_scores(rows, query)
    assert scores.dtype == np.float32 and scores.shape == (n,)
    np.testing.assert_allclose(scores, rows.astype(np.float64) @ query.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_mmr_without_diversity_is_relevance_order_and_with_it_skips_duplicates():
    q = np.array([1.0, 0.0], dtype=np.float32)
    cands = normalise_rows(np.array([[1, 0.1], [1, 0.12], [0.7, 0.7]], dtype=np.float32))
    assert mmr(q, cands, 3, 0.0) == [0, 1, 2]
    assert mmr(q, cands, 2, 0.7) == [0, 2]  # the near-duplicate of the first waits


def test_combine_parts_is_a_renormalised_weighted_rocchio_sum():
    parts = {"text": np.array([2.0, 0, 0]), "positive": np.array([0, 1.0, 0]), "negative": np.array([0, 0, 3.0])}
    got = combine_parts(parts, {"text": 1.0, "positive": 0.5, "negative": 0.5})
    np.testing.assert_allclose(got, normalise_rows(np.array([1.0, 0.5, -0.5])), rtol=1e-6)
    with pytest.raises(UserError, match="cancel"):
        combine_parts({"text": np.array([1.0, 0]), "negative": np.array([1.0, 0])}, {"negative": 1.0})


def test_ivf_search_gives_what_faiss_search_gives():
    """The served IVF search (coarse search + search_preassigned) is FAISS's own search, under OPQ too."""
    import faiss

    rng = np.random.default_rng(3)
    data = normalise_rows(rng.standard_normal((3000, 32)).astype(np.float32))
    queries = normalise_rows(rng.standard_normal((9, 32)).astype(np.float32))
    for key in ("OPQ8,IVF16,PQ8", "IVF16,Flat"):
        index = faiss.index_factory(32, key, faiss.METRIC_INNER_PRODUCT)
        index.train(data)
        index.add(data)
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 5)
        scores, ids = index.search(queries, 40)
        got_scores, got_ids = ivf_search(index, queries, 40)
        assert np.array_equal(got_ids, ids) and np.array_equal(got_scores, scores), key
    assert ivf_search(faiss.IndexFlatIP(32), queries, 5) is None


# --- the engine on a real (Flat) index -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    emb, vectors = synthetic_emb_dir(root / "emb", N, clusters=6, failed_every=100)
    build_index(emb, root / "index", progress=False)
    engine = SearchEngine(root / "index")
    engine.test_vectors = vectors
    yield engine
    engine.close()


def test_loads_what_index_json_says(engine):
    assert engine.n == N - 12 and engine.dim == 32 and engine.info.index_key == "Flat"
    assert engine.vectors.dtype == np.float16 and isinstance(engine.vectors, np.memmap)


def test_search_vectors_returns_ranked_hits_with_paths(engine):
    hits = engine.search_vectors(engine.test_vectors[[5, 6]], k=4)
    assert [row[0].id for row in hits] == [5, 6]
    for row in hits:
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        assert all(h.path == engine.path_of(h.id) for h in row)


def test_min_score_drops_weak_hits(engine):
    all_hits = engine.search_ids([5], k=50)
    cut = all_hits[10].score
    kept = engine.search_ids([5], k=50, min_score=cut)
    assert kept and all(h.score >= cut for h in kept) and len(kept) < 50


def test_path_prefix_filters_exactly_or_through_the_selector(engine, monkeypatch):
    prefix = engine.path_of(5).rsplit("/", 1)[0] + "/"
    small = engine.search_ids([5], k=20, path_prefix=prefix)
    assert small and all(h.path.startswith(prefix) for h in small) and small[0].id == 5
    monkeypatch.setattr(search_mod, "PREFILTER_LIMIT", 3)  # forces the IDSelector path through FAISS
    large = engine.search_ids([5], k=20, path_prefix=prefix)
    assert [h.id for h in large] == [h.id for h in small]
    assert engine.search_ids([5], k=5, path_prefix="nowhere/") == []


def test_query_by_ids_and_vector_agree(engine):
    by_id = engine.query(image_ids=[7], k=5)
    by_vector = engine.query(vector=engine.test_vectors[7].tolist(), k=5)
    assert [h.id for h in by_id] == [h.id for h in by_vector] and by_id[0].id == 7


def test_positive_and_negative_feedback_move_the_results(engine):
    base = engine.query(image_ids=[7], k=30)
    far = engine.search_ids([7], k=N)[-1].id
    pulled = engine.query(image_ids=[7], positive_ids=[far], weights={"positive": 3.0}, k=30)
    assert far not in {h.id for h in base} and pulled[0].id == far
    pushed = [h.id for h in engine.query(image_ids=[7], negative_ids=[base[1].id], weights={"negative": 0.9}, k=30)]
    assert (pushed.index(base[1].id) if base[1].id in pushed else len(pushed)) > 1


def test_diversity_reorders_the_same_pool(engine):
    plain = engine.query(image_ids=[9], k=10)
    diverse = engine.query(image_ids=[9], k=10, diversity=0.8)
    assert diverse[0].id == 9 and [h.id for h in diverse] != [h.id for h in plain]
    vecs = engine.vectors_for_ids([h.id for h in diverse]).astype(np.float32)
    plain_vecs = engine.vectors_for_ids([h.id for h in plain]).astype(np.float32)
    assert (vecs @ vecs.T).mean() < (plain_vecs @ plain_vecs.T).mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "empty query"),
        ({"vector": [0.1, 0.2]}, "length 32"),
        ({"vector": [float("nan")] * 32}, "NaN"),
        ({"image_ids": [99]}, "unknown image id"),  # a failed id: in vectors.npy (zero row), not in the index
        ({"image_ids": [10**12]}, "unknown image id"),
        ({"image_ids": [1], "weights": {"colour": 1.0}}, "unknown weight"),
        ({"image_ids": [1], "diversity": 2.0}, "diversity"),
        ({"image_ids": [1], "k": 0}, "k must be"),
        ({"negative_ids": [1]}, "empty query"),
    ],
)
def test_bad_queries_raise_user_errors(engine, kwargs, message):
    with pytest.raises(UserError, match=message):
        engine.query(**kwargs)


def test_unknown_id_is_also_a_key_error(engine):
    with pytest.raises(KeyError):
        engine.vectors_for_ids([99])
    assert isinstance(UnknownIdError("x"), UserError)


def test_random_ids_and_contains(engine):
    ids = engine.random_ids(20)
    assert len(set(ids)) == 20 and all(engine.contains(i) for i in ids)
    assert not engine.contains(199) and engine.path_of(199) is None


def test_missing_index_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not an index directory"):
        SearchEngine(tmp_path)


# --- text and image queries need the model: the tiny one, random weights ---------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    import torch

    from clip_hpc.formats.emb_dir import EmbDir
    from clip_hpc.model.loading import load_model

    model = load_model("clip-hpc-tiny", "none", device="cpu")
    root = tmp_path_factory.mktemp("tiny")
    images = [Image.new("RGB", (64, 64), ((i * 40) % 256, (i * 90) % 256, (i * 15) % 256)) for i in range(24)]
    real = model.encode_images(torch.stack([model.preprocess(im) for im in images]))
    EmbDir(root / "emb").write_shard(
        0,
        ShardBatch(
            embeddings=real.astype(np.float16),
            ids=range(24),
            paths=[f"/img/{i}.png" for i in range(24)],
            attrs={"model": "clip-hpc-tiny", "pretrained": "none", "dim": model.dim, "unit": 0, "unit_size": 24},
        ),
    )
    (root / "emb" / "inputs.txt").write_text("".join(f"/img/{i}.png\n" for i in range(24)))
    build_index(root / "emb", root / "index", progress=False)
    return SearchEngine(root / "index", device="cpu"), images, model


def test_text_and_image_queries_use_the_recorded_model(tiny_engine):
    engine, images, model = tiny_engine
    assert engine.info.model == "clip-hpc-tiny"
    hits = engine.search_text("a photo of a dog", k=5)
    assert len(hits) == 5
    np.testing.assert_allclose(
        engine.encoder.encode_text(["a photo of a dog"]), model.encode_text(["a photo of a dog"]), atol=1e-5
    )
    assert engine.search_image(images[13], k=1)[0].id == 13
    both = engine.query(text="a photo of a dog", images=[images[13]], weights={"text": 0.0}, k=1)
    assert both[0].id == 13
    with pytest.raises(UserError, match="empty"):
        engine.search_text("  ")
    with pytest.raises(UserError, match="cannot read image"):
        engine.search_image("/no/such/file.png")
