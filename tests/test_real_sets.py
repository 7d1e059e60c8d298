"""Real embedding sets for bench_index.py --real (clip_hpc.bench.real_sets, real_bench): a folder loads as it says,
bad folders are one-line errors, and the held-out split keeps its queries out of what is indexed. Synthetic arrays
in tmp_path, never the real sets. Cost: well under a second."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from clip_hpc.bench.real_bench import claim_gap, flat_search, interleaved_latency
from clip_hpc.bench.real_sets import load_real_set, split_held_out, vector_stats
from clip_hpc.errors import UserError


def _write_set(folder: Path, n: int = 600, dim: int = 32, texts: int = 0, pairs: bool = True) -> np.ndarray:
    rng = np.random.default_rng(1)
    images = (rng.standard_normal((n, dim)) * 3 + 1).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    if texts:
        rows = rng.choice(n, size=texts, replace=False)
        np.save(folder / "texts.npy", images[rows] + rng.standard_normal((texts, dim)).astype(np.float32))
        if pairs:
            np.save(folder / "pairs.npy", rows)
    return images


def test_a_set_loads_normalised_with_its_pairs(tmp_path):
    images = _write_set(tmp_path, texts=100)
    real = load_real_set(tmp_path)
    assert real.images.shape == images.shape and np.allclose(np.linalg.norm(real.images, axis=1), 1, atol=1e-5)
    assert real.image_stats.norm_mean > 10 and real.text_stats is not None  # the stats are of the stored rows
    assert real.texts is not None and real.pairs is not None and real.texts.shape == (100, 32)
    # each caption sits nearest its own image (the synthetic texts are their image plus noise)
    assert np.mean(np.argmax(real.texts @ real.images.T, axis=1) == real.pairs) > 0.9


def test_bad_folders_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="no images.npy"):
        load_real_set(tmp_path)
    _write_set(tmp_path, texts=50, pairs=False)
    with pytest.raises(UserError, match="no pairs.npy"):
        load_real_set(tmp_path)
    np.save(tmp_path / "pairs.npy", np.arange(50) + 10_000)
    with pytest.raises(UserError, match="image rows"):
        load_real_set(tmp_path)
    bad = np.ones((10, 32), dtype=np.float32)
    bad[3, 4] = np.nan
    np.save(tmp_path / "images.npy", bad)
    with pytest.raises(UserError, match="NaN"):
        load_real_set(tmp_path)
    np.save(tmp_path / "images.npy", np.ones(10, dtype=np.float32))
    with pytest.raises(UserError, match="2-D"):
        load_real_set(tmp_path)


def test_held_out_queries_are_never_indexed_and_captions_point_at_their_image(tmp_path):
    _write_set(tmp_path, texts=200)
    real = load_real_set(tmp_path)
    split = split_held_out(real, 50, 80, seed=3)
    assert len(split.base) == 550 and len(split.image_queries) == 50 and len(split.text_queries) <= 80
    held_rows = np.setdiff1d(np.arange(600), split.base_rows)
    assert np.array_equal(split.image_queries, real.images[held_rows])
    assert np.array_equal(split.base, real.images[split.base_rows])
    # a caption query's target is its own image, which is indexed
    assert real.pairs is not None and real.texts is not None
    for query, target in zip(split.text_queries, split.text_targets):
        (row,) = np.flatnonzero((real.texts == query).all(axis=1))
        assert split.base_rows[target] == real.pairs[row]
    assert split.text_source == "captions"
    again = split_held_out(real, 50, 80, seed=3)
    assert np.array_equal(again.base_rows, split.base_rows)  # a seed names one split
    assert not np.array_equal(split_held_out(real, 50, 80, seed=4).base_rows, split.base_rows)
    with pytest.raises(UserError, match="fewer than half"):
        split_held_out(real, 400, 10)


def test_a_set_without_captions_gets_text_like_queries_far_from_their_image(tmp_path):
    _write_set(tmp_path, dim=512)
    split = split_held_out(load_real_set(tmp_path), 40, 64, seed=0)
    assert split.text_source == "synthetic text-like" and split.text_queries.shape == (64, 512)
    cosine = np.sum(split.text_queries * split.base[split.text_targets], axis=1)
    # text-like: 0.25-0.45 to their own image (the gap direction is nearly orthogonal to it in 512-d)
    assert 0.25 <= cosine.mean() <= 0.45 and np.all((cosine > 0.15) & (cosine < 0.55))


def test_vector_stats_report_raw_norms_and_mean_cosine():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(64)
    vectors = (shared + rng.standard_normal((500, 64))).astype(np.float32) * 2
    stats = vector_stats(vectors)
    assert stats.n == 500 and stats.dim == 64 and stats.norm_mean > 10
    assert 0.4 < stats.mean_pairwise_cosine < 0.6  # half the variance shared: cosine about 0.5


def test_interleaved_latency_times_every_method_and_flat_search_is_exact():
    vectors = np.random.default_rng(2).standard_normal((300, 16)).astype(np.float32)
    search = flat_search(vectors)
    assert np.array_equal(search(vectors[:5], 1)[:, 0], np.arange(5))
    before = faiss.omp_get_max_threads()
    latency = interleaved_latency({"a": search, "b": search}, vectors[:20], threads=1)
    assert faiss.omp_get_max_threads() == before  # FAISS's threads as they were
    assert set(latency) == {"a", "b"} and all(0 < v.p50_ms <= v.p99_ms for v in latency.values())
    calls: list[str] = []
    recording = {name: (lambda q, k, name=name: calls.append(name)) for name in ("a", "b")}
    timed = interleaved_latency(recording, vectors[:6], threads=1, block=3)  # type: ignore[arg-type]
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3  # a block each in turn, the order alternating
    assert set(timed) == {"a", "b"}
    held_out = {"recall_images": 0.995, "recall_text": 0.95}
    claims = {"in-distribution": 0.99, "text-like": 0.97}
    assert claim_gap(claims, held_out) == {"images": -0.005, "text": 0.02}  # each family against its own claim
    assert claim_gap({**claims, "captions": 0.96}, held_out)["text"] == 0.01  # real captions, where measured
    assert claim_gap({}, {"recall_images": 1.0, "recall_text": 1.0}) == {"images": None, "text": None}
