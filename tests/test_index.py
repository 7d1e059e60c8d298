"""The index stage: parameter choice, the recall self-check, builds from real shards, refusals, --update."""

from __future__ import annotations

import json
import math
import re

import faiss
import h5py
import numpy as np
import pytest

from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k
from clip_hpc.ann.text_queries import off_distribution_queries
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.formats.shard import ShardBatch
from clip_hpc.index.build import build_index
from clip_hpc.index.choose import choose_index_key, choose_train_size, ivf_lists
from clip_hpc.index.update import update_index
from clip_hpc.search.engine import SearchEngine
from conftest import make_images, run_cli
from index_fixtures import synthetic, synthetic_emb_dir

IVF_KEY = "IVF16,PQ8x4fs"


# --- the pure core ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [10_000, 200_000, 1_000_000, 10**9])
@pytest.mark.parametrize("dim", [512, 768])
def test_auto_key_follows_the_contract(n, dim):
    # K in [2·√N, 4·√N); d/16 bytes of codes: fast-scan 4-bit PQ{d/8} while the lists stay in memory (issue 24:
    # better candidates for text-like queries than OPQ + 8-bit PQ at the same bytes, a quarter of the scan), and
    # 8-bit PQ{d/16} under an OPQ rotation (from 50k) when they go to disk, where fast-scan blocks cannot go
    for on_disk in (False, True):
        key = choose_index_key(n, dim, lists_on_disk=on_disk)
        nlist = ivf_lists(key)
        assert 2 * math.sqrt(n) <= nlist < 4 * math.sqrt(n)
        hnsw = "_HNSW32" if nlist >= 65_536 else ""
        rotation = f"OPQ{dim // 16}," if n >= 50_000 else ""
        codes = f"{rotation}IVF{nlist}{hnsw},PQ{dim // 16}" if on_disk else f"IVF{nlist}{hnsw},PQ{dim // 8}x4fs"
        assert key == codes
        train = choose_train_size(n, key)
        assert 30 * nlist <= train <= 256 * nlist or train == n


def test_auto_key_is_flat_for_small_sets():
    assert choose_index_key(9_999, 512) == "Flat"
    assert choose_train_size(9_999, "Flat") == 0
    assert choose_train_size(5_000, "IVF256,PQ8") == 5_000  # never more than there is


# --- builds from shards ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flat_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    emb, vectors = synthetic_emb_dir(root / "emb", 1500, failed_every=50)
    info = build_index(emb, root / "index", progress=False)
    return root, info, vectors


def test_flat_build_writes_the_contracted_files(flat_index):
    root, info, vectors = flat_index
    index_dir = root / "index"
    assert sorted(p.name for p in index_dir.iterdir()) == ["index.faiss", "index.json", "meta.sqlite", "vectors.npy"]
    on_disk = json.loads((index_dir / "index.json").read_text())
    assert on_disk == info.to_dict()
    for field in ("index_key", "nprobe", "n", "dim", "model", "pretrained", "refine", "timings", "recall"):
        assert field in on_disk
    assert info.index_key == "Flat" and info.refine is False
    assert info.n == 1500 - 30 and info.n_rows == 1500 and info.row_layout == "global_id"
    assert info.recall["served"] == 1.0
    assert not list(root.glob(".index.tmp-*"))


def test_vectors_npy_row_is_the_global_id(flat_index):
    root, _, vectors = flat_index
    stored = np.load(root / "index" / "vectors.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (1500, 32)
    ok = np.arange(1500) % 50 != 49
    np.testing.assert_array_equal(stored[ok], vectors[ok].astype(np.float16))
    assert not np.any(stored[~ok])


def test_every_embedded_id_is_found_by_its_own_vector(flat_index):
    root, _, vectors = flat_index
    engine = SearchEngine(root / "index", nprobe=None)
    ids = [i for i in range(1500) if i % 50 != 49]
    hits = engine.search_vectors(vectors[ids], k=1)
    assert [h[0].id for h in hits] == ids
    assert all(h[0].score == pytest.approx(1.0, abs=2e-3) for h in hits)
    assert hits[3][0].path == synthetic.synthetic_path(3, int(re.search(r"c(\d+)", hits[3][0].path).group(1)))
    assert not engine.contains(49) and engine.contains(48)


def test_ivf_build_tunes_nprobe_and_its_recall_is_real(tmp_path):
    emb, vectors = synthetic_emb_dir(tmp_path / "emb", 4000, seed=3)
    info = build_index(emb, tmp_path / "index", index_key=IVF_KEY, progress=False)
    recall, nprobe = info.recall, info.nprobe
    assert info.refine is True and recall["target_met"] and recall["served"] >= 0.95
    tuned = {
        int(k.split(",")[0][6:]): v
        for k, v in recall["tuning_lower_bounds"].items()
        if k.endswith(f"refine{info.refine_factor}")
    }
    assert all(v < 0.95 for p, v in tuned.items() if p < nprobe)  # the smallest that reaches the target
    # measured again, independently, with queries the self-check never saw
    rng = np.random.default_rng(42)
    queries = off_distribution_queries(vectors[rng.choice(4000, 100, replace=False)], rng)
    exact = exact_top_k(queries, vectors, 10)
    engine = SearchEngine(tmp_path / "index")
    approx = np.array([[h.id for h in row] for row in engine.search_vectors(queries, 10)])
    assert recall_at_k(approx, exact, 10) >= 0.9
    plain = SearchEngine(tmp_path / "index", refine=False)
    approx_plain = np.array([[h.id for h in row] for row in plain.search_vectors(queries, 10)])
    assert recall_at_k(approx_plain, exact, 10) < recall_at_k(approx, exact, 10)


# --- refusals: a clear error and no INDEX_DIR ------------------------------------------------------------------
def _break_dims(emb):
    EmbDir(emb).write_shard(
        1,
        ShardBatch(
            embeddings=np.ones((2, 16), np.float16),
            ids=[500, 501],
            paths=["a", "b"],
            attrs={"model": synthetic.MODEL, "pretrained": "none", "dim": 16, "unit": 1, "unit_size": 500},
        ),
    )


def _break_model(emb):
    shard = h5py.File(EmbDir(emb).shard_path(1), "r+")
    shard.attrs["model"] = "ViT-B-32"
    shard.close()


def _break_missing(emb):
    EmbDir(emb).shard_path(1).unlink()


def _break_truncated(emb):
    path = EmbDir(emb).shard_path(1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, message",
    [(_break_dims, "dims"), (_break_model, "models"), (_break_missing, "missing units"), (_break_truncated, "shard")],
)
def test_a_bad_shard_set_is_refused_and_nothing_is_written(tmp_path, damage, message):
    emb, _ = synthetic_emb_dir(tmp_path / "emb", 1500)
    damage(emb)
    with pytest.raises(UserError, match=message):
        build_index(emb, tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists() and not list(tmp_path.glob(".index*"))
    proc = run_cli("index", emb, "--out", tmp_path / "index")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("clip-hpc index: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(
    "key, message", [("IVF99999,PQ8", "needs at least"), ("NotAnIndex", "factory"), ("IVF16,PQ7", "factory")]
)
def test_a_bad_index_key_is_refused(tmp_path, key, message):
    emb, _ = synthetic_emb_dir(tmp_path / "emb", 600)
    with pytest.raises(UserError, match=message):
        build_index(emb, tmp_path / "index", index_key=key, progress=False)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("key", ["PQ4", "IVF1,PQ4"])
def test_a_key_whose_codebooks_need_more_vectors_than_the_shards_hold_is_one_line(tmp_path, key):
    """PQ4 trains 256 centroids per sub-quantizer; on 5 vectors FAISS raised and `clip-hpc index` printed its
    traceback (exit 1) instead of the one-line error every other bad key gets."""
    emb, _ = synthetic_emb_dir(tmp_path / "emb", 5)
    proc = run_cli("index", emb, "--out", tmp_path / "index", "--index-key", key, "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (FAISS's own k-means warning may come before it)
    assert last.startswith("clip-hpc index: error:") and key in last and "5 vectors" in last and "256" in last
    assert not (tmp_path / "index").exists() and not list(tmp_path.glob(".index*"))


def test_an_existing_index_dir_is_not_overwritten(flat_index):
    root, info, _ = flat_index
    with pytest.raises(UserError, match="--update"):
        build_index(root / "emb", root / "index", progress=False)
    assert json.loads((root / "index" / "index.json").read_text()) == info.to_dict()


# --- --update --------------------------------------------------------------------------------------------------
def test_update_adds_new_units_without_retraining(tmp_path):
    vectors, labels = synthetic.gaussian_mixture(3000, 32, 20, latent=8, seed=5)
    emb = tmp_path / "emb"
    synthetic.write_emb_dir(emb, vectors[:2000], labels[:2000], 500)
    build_index(emb, tmp_path / "index", index_key=IVF_KEY, progress=False)
    before = faiss.read_index(str(tmp_path / "index" / "index.faiss"))
    old = SearchEngine(tmp_path / "index")
    old_paths = old.meta.paths_of(range(2000))
    old_hits = [h.id for h in old.search_ids([17], k=5)]
    assert update_index(emb, tmp_path / "index", progress=False).updates == []  # nothing new

    synthetic.write_emb_dir(emb, vectors[2000:], labels[2000:], 500, first_id=2000)
    info = update_index(emb, tmp_path / "index", progress=False)
    after = faiss.read_index(str(tmp_path / "index" / "index.faiss"))
    assert after.ntotal == 3000 and info.n == 3000 and info.updates[0]["added"] == 1000
    assert info.updates[0]["units"] == [4, 5] and info.updates[0]["timings"]["train_s"] == 0
    np.testing.assert_array_equal(
        faiss.extract_index_ivf(after).quantizer.reconstruct_n(0, 16),
        faiss.extract_index_ivf(before).quantizer.reconstruct_n(0, 16),
    )
    engine = SearchEngine(tmp_path / "index")
    assert engine.meta.paths_of(range(2000)) == old_paths
    new_ids = list(range(2000, 3000, 37))
    assert [row[0].id for row in engine.search_vectors(vectors[new_ids], k=1)] == new_ids
    assert [h.id for h in engine.search_ids([17], k=5)][0] == old_hits[0] == 17
    assert not list(tmp_path.glob(".index*"))


def test_update_follows_a_unit_re_embedded_with_as_many_images_but_other_ones(tmp_path):
    """A re-run re-embedded unit 1 after one image was fixed (12) and another broke (13): the same count, so
    --update, which compared counts only, never indexed 12 and kept 13's old vector and path."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    emb = EmbDir(tmp_path / "emb")
    emb.write_inputs([f"/img/{i}.jpg" for i in range(20)])

    def unit(u: int, failed: int | None) -> None:
        ids = [i for i in range(10 * u, 10 * u + 10) if i != failed]
        emb.write_shard(
            u,
            ShardBatch(
                embeddings=vectors[ids],
                ids=ids,
                paths=[f"/img/{i}.jpg" for i in ids],
                failed_ids=[failed] if failed is not None else [],
                failed_paths=[f"/img/{failed}.jpg"] if failed is not None else [],
                failed_reasons=["missing file"] if failed is not None else [],
                attrs={"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": 10},
            ),
        )

    unit(0, None)
    unit(1, 12)
    build_index(emb.root, tmp_path / "index", progress=False)
    unit(1, 13)
    info = update_index(emb.root, tmp_path / "index", progress=False)
    engine = SearchEngine(tmp_path / "index")
    assert sorted(engine.meta.all_ids()) == [i for i in range(20) if i != 13]
    assert info.n == 19 and info.updates[-1]["units"] == [1]
    assert [row[0].id for row in engine.search_vectors(vectors[[12, 13]].astype(np.float32), k=1)][0] == 12
    assert 13 not in [row[0].id for row in engine.search_vectors(vectors[[13]].astype(np.float32), k=19)]
    assert not IndexDir(tmp_path / "index").open_vectors()[13].any()  # nor does exact search (the self-check) see it


def test_update_refuses_another_model_and_keeps_the_index(tmp_path):
    emb, _ = synthetic_emb_dir(tmp_path / "emb", 600)
    info = build_index(emb, tmp_path / "index", progress=False)
    other, _ = synthetic_emb_dir(tmp_path / "other", 600, dim=16)
    with pytest.raises(UserError, match="build a new index"):
        update_index(other, tmp_path / "index", progress=False)
    assert json.loads((tmp_path / "index" / "index.json").read_text()) == info.to_dict()


def _listing(out, names, dim=16, unit_size=25):
    """An EMB_DIR whose vector for a name depends only on the name: re-embedding the same file gives the same row."""
    emb = EmbDir(out)
    emb.write_inputs(names)
    rows = np.stack([np.random.default_rng(int(n[-8:-4])).standard_normal(dim) for n in names]).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    for start in range(0, len(names), unit_size):
        ids = np.arange(start, min(len(names), start + unit_size))
        emb.write_shard(
            start // unit_size,
            ShardBatch(
                embeddings=rows[ids].astype(np.float16),
                ids=ids,
                paths=[names[i] for i in ids],
                failed_ids=[],
                failed_paths=[],
                failed_reasons=[],
                attrs={"model": "m", "pretrained": "none", "dim": dim, "unit_size": unit_size},
            ),
        )
    return out


def test_update_refuses_an_emb_dir_whose_listing_moved_the_indexed_ids(tmp_path):
    """New files sorted in between old ones (a fresh `embed`, not `--append`) give old images new ids: adding the
    ids past the old end duplicated 20 indexed images and never indexed 20 new ones."""
    old = [f"/img/{i:04d}.jpg" for i in range(0, 200, 2)]
    _listing(tmp_path / "a", old)
    info = build_index(tmp_path / "a", tmp_path / "index", progress=False)
    _listing(tmp_path / "b", sorted(old + [f"/img/{i:04d}.jpg" for i in range(1, 40, 2)]))
    with pytest.raises(UserError, match="id 1 .*/img/0002.jpg.*/img/0001.jpg.*--append"):
        update_index(tmp_path / "b", tmp_path / "index", progress=False)
    assert json.loads((tmp_path / "index" / "index.json").read_text()) == info.to_dict()
    _listing(tmp_path / "a", old + [f"/img/{i:04d}.jpg" for i in range(1, 40, 2)])  # what --append does: fine
    assert update_index(tmp_path / "a", tmp_path / "index", progress=False).n == 120


# --- the real pipeline: clip-hpc embed (tiny model) -> index -> search, then embed --append -> index --update ----
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    images = make_images(root / "images", 45)
    run_cli(
        "embed",
        images,
        "--out",
        root / "emb",
        "--model",
        "clip-hpc-tiny",
        "--pretrained",
        "none",
        "--shard-size",
        "20",
        "--workers",
        "0",
        check=True,
    )
    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    return root


def test_every_embedded_image_is_searchable_by_id(embedded):
    engine = SearchEngine(embedded / "index")
    assert (
        EmbDir(embedded / "emb").read_shard(0, with_embeddings=False).attrs["model"]
        == engine.info.model
        == "clip-hpc-tiny"
    )
    ids = engine.meta.all_ids()
    assert len(ids) == engine.n >= 40
    for i in ids:
        top = engine.search_ids([i], k=3)[0]
        assert top.id == i and top.score == pytest.approx(1.0, abs=2e-3) and top.path == engine.path_of(i)


def test_search_cli_prints_ranked_paths(embedded):
    proc = run_cli("search", embedded / "index", "a red circle", "-k", "5", check=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5 and all(re.match(r"\s*\d+\s+-?\d\.\d{4}\s+/", line) for line in lines)
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    engine = SearchEngine(embedded / "index")
    some = engine.path_of(engine.meta.all_ids()[7])
    result = json.loads(run_cli("search", embedded / "index", "--image", some, "-k", "3", "--json", check=True).stdout)[
        "results"
    ]
    assert result[0]["path"] == some and result[0]["score"] == pytest.approx(1.0, abs=1e-2)
    bad = run_cli("search", embedded / "index")
    assert bad.returncode == 2 and bad.stderr.startswith("clip-hpc search: error:")


def test_update_after_embed_append(embedded, tmp_path):
    import shutil

    emb, index = tmp_path / "emb", tmp_path / "index"
    shutil.copytree(embedded / "emb", emb)
    shutil.copytree(embedded / "index", index)
    old = SearchEngine(index)
    old_ids, old_paths = old.meta.all_ids(), old.meta.paths_of(old.meta.all_ids())
    more = make_images(tmp_path / "more", 12, seed=7)
    run_cli(
        "embed",
        embedded / "images",
        more,
        "--out",
        emb,
        "--model",
        "clip-hpc-tiny",
        "--pretrained",
        "none",
        "--shard-size",
        "20",
        "--workers",
        "0",
        "--append",
        check=True,
    )
    proc = run_cli("index", emb, "--out", index, "--update", "--quiet", check=True)
    info = json.loads((index / "index.json").read_text())
    assert info["updates"] and info["updates"][-1]["timings"]["train_s"] == 0, proc.stdout
    engine = SearchEngine(index)
    assert engine.meta.paths_of(old_ids) == old_paths
    new = [i for i in engine.meta.all_ids() if i not in set(old_ids)]
    assert len(new) >= 10 and all(str(more) in engine.path_of(i) for i in new)
    for i in new:
        assert engine.search_ids([i], k=1)[0].id == i


# --- the acceptance run: 100k clustered 512-d vectors, where the 80 B/vector budget is tightest -----------------
@pytest.mark.slow
def test_100k_mixture_auto_ivf_pq_fits_80_bytes_and_refine_wins_back_recall(tmp_path):
    n, dim = 100_000, 512
    vectors, labels = synthetic.gaussian_mixture(n, dim, 1000, seed=11)
    synthetic.write_emb_dir(tmp_path / "emb", vectors, labels, 50_000)
    vectors = vectors.astype(np.float16).astype(np.float32)
    # with the tier off (no RAM-heavy codes: neither the SQ4 tier nor SQ8 lists) the auto key holds 80 B/vector
    info = build_index(tmp_path / "emb", tmp_path / "index", progress=False, rerank_tier="off")
    assert "IVF" in info.index_key and "PQ" in info.index_key and info.tier is None
    assert (tmp_path / "index" / "index.faiss").stat().st_size / n <= 80 and info.ram_bytes_per_vector <= 80
    assert info.recall["target_met"]
    rng = np.random.default_rng(99)  # fresh queries, not the self-check's
    queries = {"in": vectors[rng.choice(n, 200, replace=False)]}
    queries["off"] = off_distribution_queries(queries["in"], rng)
    recall = {}
    for refine in (True, False):
        engine = SearchEngine(tmp_path / "index", refine=refine)
        for name, q in queries.items():
            approx = np.array([[h.id for h in row] for row in engine.search_vectors(q, 10)])
            recall[name, refine] = recall_at_k(approx, exact_top_k(q, vectors, 10), 10)
    print(f"\n100k {info.index_key} nprobe {info.nprobe}: recall@10 {recall}; self-check {info.recall}")
    assert recall["in", True] >= 0.95 and recall["off", True] >= 0.95
    assert recall["off", False] < recall["off", True]
