"""The many-rank index build: real mpiexec ranks, errors reaching every rank, lists merged on disk and served
memory-mapped. Costs: ~20 s (20k vectors, one rank, on-disk lists, a real `clip-hpc serve`), ~40 s for the
mpi tests, ~1.5 min for the slow 50k comparison (the 100k one took 5.6 min on the same loaded machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import faiss
import numpy as np
import pytest

from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.index.build import build_index
from clip_hpc.index.choose import OPQ_FROM
from clip_hpc.index.rerank_tier import TIER_FROM
from clip_hpc.search.engine import SearchEngine
from conftest import BIN
from index_fixtures import synthetic
from server_fixtures import start_server


def _index_ids(index_dir) -> np.ndarray:
    """Every id in every inverted list, sorted."""
    index = IndexDir(index_dir).open_index()
    ivf = faiss.extract_index_ivf(index)
    lists = [
        faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if ivf.invlists.list_size(i)
    ]
    return np.sort(np.concatenate(lists))


def _recall(index_dir, vectors, n_queries=200, seed=5) -> float:
    rng = np.random.default_rng(seed)
    queries = vectors[rng.choice(len(vectors), n_queries, replace=False)]
    engine = SearchEngine(index_dir, encoder=_Vectors(vectors.shape[1]))
    found = np.array([[h.id for h in row] for row in engine.search_vectors(queries, 10)])
    return recall_at_k(found, exact_top_k(queries, vectors, 10), 10)


class _Vectors:
    image_size = 32

    def __init__(self, dim):
        self.dim = dim


def _mpiexec_index(n_ranks, emb, out, *extra):
    return subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            str(n_ranks),
            str(BIN / "clip-hpc"),
            "index",
            str(emb),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def tiny_model_vectors(tmp_path_factory):
    """20k mixture vectors recorded as clip-hpc-tiny's (128-d), so `clip-hpc serve` can load the model."""
    root = tmp_path_factory.mktemp("ranks")
    vectors, labels = synthetic.gaussian_mixture(20_000, 128, 100, seed=4)
    synthetic.write_emb_dir(root / "emb", vectors, labels, 2_500, model="clip-hpc-tiny", pretrained="none")
    return root, vectors.astype(np.float16).astype(np.float32)


def test_on_disk_lists_load_in_search_engine_and_in_serve(tiny_model_vectors, tmp_path):
    root, vectors = tiny_model_vectors
    disk = build_index(root / "emb", tmp_path / "disk", lists="disk", progress=False)
    memory = build_index(root / "emb", tmp_path / "memory", lists="memory", progress=False)
    assert disk.lists == "disk" and IndexDir(tmp_path / "disk").has_ondisk_lists()
    assert not list((tmp_path / "disk").glob("parts*")) and not IndexDir(tmp_path / "memory").has_ondisk_lists()
    assert disk.n == memory.n == 20_000
    np.testing.assert_array_equal(_index_ids(tmp_path / "disk"), np.arange(20_000))
    # the directory moved after the build: the lists are found beside index.faiss, memory-mapped
    (tmp_path / "disk").rename(tmp_path / "moved")
    engine = SearchEngine(tmp_path / "moved", encoder=_Vectors(128))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(engine.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # memory-mapped, not read into RAM
    assert [row[0].id for row in engine.search_vectors(vectors[[3, 999, 17_000]], 1)] == [3, 999, 17_000]
    assert abs(_recall(tmp_path / "moved", vectors) - _recall(tmp_path / "memory", vectors)) <= 0.01
    with start_server(tmp_path / "moved", tmp_path / "serve") as served, served.client() as client:
        hits = client.post("/api/search", json={"vector": vectors[42].tolist(), "k": 3}).json()["results"]
        assert hits[0]["id"] == 42
        assert client.get("/api/search", params={"q": "a photo of a dog", "k": 5}).status_code == 200


@pytest.mark.mpi
@pytest.mark.parametrize("lists", ["disk", "memory"])
def test_mpiexec_two_ranks_build_the_same_index(tiny_model_vectors, tmp_path, lists):
    root, vectors = tiny_model_vectors
    one = _mpiexec_index(1, root / "emb", tmp_path / "one", "--rerank-tier", "on")
    two = _mpiexec_index(2, root / "emb", tmp_path / "two", "--lists", lists, "--rerank-tier", "on")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert sum(" vectors, " in line for line in two.stdout.splitlines()) == 1  # one rank reports
    info_one, info_two = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "two"))
    assert info_one["ranks"] == 1 and info_two["ranks"] == 2 and info_two["lists"] == lists
    assert len(info_two["timings"]["add_s_per_rank"]) == 2
    np.testing.assert_array_equal(_index_ids(tmp_path / "one"), _index_ids(tmp_path / "two"))
    assert abs(_recall(tmp_path / "one", vectors) - _recall(tmp_path / "two", vectors)) <= 0.01
    # the re-rank tier's rows, written by each rank for its own units, are the one-rank build's (compared before
    # the self-check may drop the tier: both builds keep the trained tier's codes where it pays)
    for d in ("one", "two"):
        assert IndexDir(tmp_path / d).has_tier() == bool(json.loads((tmp_path / d / "index.json").read_text())["tier"])
    if IndexDir(tmp_path / "one").has_tier() and IndexDir(tmp_path / "two").has_tier():
        np.testing.assert_array_equal(
            np.load(tmp_path / "one" / "tier_codes.npy"), np.load(tmp_path / "two" / "tier_codes.npy")
        )


@pytest.mark.mpi
def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1 fails while adding: both ranks exit with an error naming it, and nobody waits forever."""
    script = (
        "from clip_hpc.cluster.world import world\n"
        "from clip_hpc.errors import UserError\n"
        "from clip_hpc.cluster.collective import from_root, on_every_rank\n"
        "w = world()\n"
        "assert from_root(w, lambda: 'plan') == 'plan'\n"
        "def add():\n"
        "    if w.rank == 1:\n"
        "        raise UserError('shard 3 unreadable')\n"
        "    return w.rank\n"
        "try:\n"
        "    on_every_rank(w, add)\n"
        "except UserError as exc:\n"
        "    print(f'rank {w.rank}: {exc}', flush=True)\n"
        "    raise SystemExit(2)\n"
        "print('no error', flush=True)\n"
    )
    proc = subprocess.run(
        [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "no error" not in proc.stdout
    assert "rank 0: rank 1 failed: shard 3 unreadable" in proc.stdout
    assert "rank 1: shard 3 unreadable" in proc.stdout


@pytest.mark.slow
@pytest.mark.mpi
def test_mpiexec_two_ranks_on_50k_match_one_rank(tmp_path):
    """The issue's acceptance run, cut to keep the suite under 20 minutes (200k at 512-d is in
    scripts/bench_index.py): same ntotal and ids, recall within 0.01, and the two-rank index merged on disk serves.
    50,000 is the least size that still takes the large-index paths: the OPQ rotation of on-disk lists (OPQ_FROM)
    and the re-rank tier written by both ranks (TIER_FROM); both are asserted."""
    n, dim = OPQ_FROM, 128
    assert TIER_FROM <= n
    vectors, labels = synthetic.gaussian_mixture(n, dim, 1000, seed=11)
    synthetic.write_emb_dir(tmp_path / "emb", vectors, labels, 12_500, model="clip-hpc-tiny", pretrained="none")
    vectors = vectors.astype(np.float16).astype(np.float32)
    # the self-check checks one setting (its sweep took up to 60 s an index on 2 cores, the same at any size), and
    # training takes 30 points a list (the contract's least, not all 50,000)
    fixed = ("--nprobe", "32", "--refine-factor", "50", "--train-size", "15360")
    one = _mpiexec_index(1, tmp_path / "emb", tmp_path / "one", *fixed)
    two = _mpiexec_index(2, tmp_path / "emb", tmp_path / "two", "--lists", "disk", *fixed)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    info_one, info_two = (IndexDir(tmp_path / d).load_info() for d in ("one", "two"))
    assert info_one.n == info_two.n == n and info_two.ranks == 2 and info_two.lists == "disk"
    assert info_two.index_key.startswith("OPQ") and "tier_train_s" in info_two.timings, info_two.index_key
    np.testing.assert_array_equal(_index_ids(tmp_path / "one"), _index_ids(tmp_path / "two"))
    r1, r2 = _recall(tmp_path / "one", vectors), _recall(tmp_path / "two", vectors)
    print(f"\n50k one rank {r1:.4f}, two ranks {r2:.4f}; timings {info_one.timings} vs {info_two.timings}")
    assert abs(r1 - r2) <= 0.01
    with start_server(tmp_path / "two", tmp_path / "serve") as served, served.client() as client:
        hits = client.post("/api/search", json={"vector": vectors[43_210].tolist(), "k": 3}).json()["results"]
        assert hits[0]["id"] == 43_210
