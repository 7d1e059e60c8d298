"""The HNSW graph candidate (ann/graph.py): its rows and ids, its search width, filters, and an index that serves it."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from clip_hpc.ann.core import search_candidates, set_nprobe
from clip_hpc.ann.graph import EF_LADDER, GRAPH_M, build_graph, graph_bytes, graph_key, graph_of
from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k
from clip_hpc.ann.text_queries import off_distribution_queries
from clip_hpc.devdata import synthetic_vectors as synthetic
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.shard import ShardBatch
from clip_hpc.index.build import build_index
from clip_hpc.index.update import update_index
from clip_hpc.search.engine import SearchEngine


@pytest.fixture(scope="module")
def rows():
    vectors, _ = synthetic.gaussian_mixture(3000, 32, 20, latent=8, seed=3)
    stored = vectors.astype(np.float16)
    stored[[5, 700, 2999]] = 0  # never embedded, or removed
    return stored


def test_the_graph_holds_every_embedded_row_under_its_global_id(rows):
    index = build_graph(rows)
    assert index.ntotal == len(rows) - 3 and graph_of(index) is not None and graph_of(faiss.IndexFlatIP(4)) is None
    queries = rows[[1, 800, 2500]].astype(np.float32)
    set_nprobe(index, 256)
    assert graph_of(index).hnsw.efSearch == 256  # the search width of a graph is its efSearch
    _, ids = index.search(queries, 1)
    assert ids[:, 0].tolist() == [1, 800, 2500]
    found = index.search(rows.astype(np.float32), 50)[1]
    assert not np.isin([5, 700, 2999], found).any()
    assert graph_bytes(1000, 512) > 1000 * 512 * 4 + 1000 * 2 * GRAPH_M * 4


def test_a_filtered_search_of_a_graph_keeps_to_the_selector_at_its_width(rows):
    index = build_graph(rows)
    set_nprobe(index, 128)
    allowed = np.arange(1000, 2000)
    queries = rows[[10, 1500]].astype(np.float32)
    _, ids = search_candidates(index, queries, 10, 10, selector=faiss.IDSelectorBatch(allowed))
    assert np.isin(ids, allowed).all() and (ids >= 0).all()
    assert ids[1, 0] == 1500
    stored = rows.astype(np.float32).copy()
    stored[np.setdiff1d(np.arange(len(rows)), allowed)] = 0
    assert recall_at_k(ids, exact_top_k(queries, stored, 10), 10) >= 0.9


def rewrite_unit_with_a_failure(emb: EmbDir, vectors: np.ndarray, unit: int, size: int, failed: int) -> None:
    ids = np.arange(unit * size, (unit + 1) * size)
    ok, paths = ids != failed, emb.read_inputs()
    attrs = {"model": synthetic.MODEL, "pretrained": "none", "dim": vectors.shape[1], "unit": unit, "unit_size": size}
    batch = ShardBatch(
        embeddings=vectors[ids[ok]].astype(np.float16),
        ids=ids[ok],
        paths=[paths[i] for i in ids[ok]],
        failed_ids=ids[~ok],
        failed_paths=[paths[failed]],
        failed_reasons=["now unreadable"],
        attrs=attrs,
    )
    emb.write_shard(unit, batch)


@pytest.mark.parametrize("failed", [None, 1234])
def test_a_named_graph_key_tunes_its_efsearch_and_an_update_builds_it_anew(tmp_path, failed):
    """Adding works on a graph, removing does not (FAISS's HNSW has no remove_ids): --update builds it from the
    rows, so a unit re-embedded with an image that now fails leaves no trace of it."""
    vectors, labels = synthetic.gaussian_mixture(3000, 32, 20, latent=8, seed=5)
    emb = tmp_path / "emb"
    synthetic.write_emb_dir(emb, vectors[:2000], labels[:2000], 500)
    info = build_index(emb, tmp_path / "index", index_key=graph_key(), progress=False)
    assert info.index_key == graph_key() and info.nprobe in EF_LADDER and not info.refine
    assert info.recall["tuning_lower_bounds"]  # the efSearch ladder was priced, not left at FAISS's 16
    engine = SearchEngine(tmp_path / "index")
    assert graph_of(engine.index).hnsw.efSearch == info.nprobe
    engine.close()
    if failed is not None:  # unit 2 re-embedded, one image of it now failing
        rewrite_unit_with_a_failure(EmbDir(emb), vectors, 2, 500, failed)
    synthetic.write_emb_dir(emb, vectors[2000:], labels[2000:], 500, first_id=2000)
    updated = update_index(emb, tmp_path / "index", progress=False)
    expect = 3000 - (failed is not None)
    assert updated.n == expect and updated.index_key == graph_key() and updated.nprobe == info.nprobe
    engine = SearchEngine(tmp_path / "index")
    try:
        new_ids = list(range(2000, 3000, 37))
        assert [row[0].id for row in engine.search_vectors(vectors[new_ids], k=1)] == new_ids
        if failed is not None:
            assert failed not in [h.id for row in engine.search_vectors(vectors[[failed]], k=20) for h in row]
        rng = np.random.default_rng(9)
        queries = off_distribution_queries(vectors[rng.choice(3000, 100, replace=False)], rng)
        found = np.array([[h.id for h in row] for row in engine.search_vectors(queries, 10)])
        stored = np.asarray(engine.vectors, dtype=np.float32)
        assert recall_at_k(found, exact_top_k(queries, stored, 10), 10) >= 0.93
    finally:
        engine.close()
