"""`clip-hpc dedup`: the pure core (border guarantee, exact pairs, union-find), the job on synthetic vectors with
planted near-duplicates against exact all-pairs search (1 rank and real `mpiexec -n 2`), re-runs and errors, and
real photos with re-encoded, resized and cropped copies embedded by the shipped `clip-hpc-demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from clip_hpc.devdata.near_duplicates import perturbed, with_near_duplicates
from clip_hpc.devdata.synthetic_vectors import write_emb_dir
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.subsets import dedup_core as core
from conftest import BIN, ROOT, run_cli
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

THRESHOLD = 0.95
THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


# --- the pure core ---------------------------------------------------------------------------------------------
def test_border_margin_keeps_every_pair_in_the_nearest_partition_of_one_end():
    rng = np.random.default_rng(0)
    centroids = core.unit_rows(rng.standard_normal((40, 16)))
    x = core.unit_rows(rng.standard_normal((3000, 16)))
    y = perturbed(x, rng.uniform(0.9, 1.0, len(x)), rng)  # partners at cosine 0.9..1, many across a border
    for threshold in (0.9, 0.95, 0.99):
        pair = np.einsum("ij,ij->i", x, y) >= threshold
        margin = core.border_margin(threshold)
        ax, ay = core.assign_partitions(x, centroids, margin), core.assign_partitions(y, centroids, margin)
        home = ax.partitions[ax.primary][np.argsort(ax.rows[ax.primary])]  # x's nearest partition
        joined = set(zip(ay.rows.tolist(), ay.partitions.tolist()))
        assert all((i, int(home[i])) in joined for i in np.flatnonzero(pair))
        split = home != np.argmax(y @ centroids.T, axis=1)
        assert (pair & split).sum() > 20, "the test must have pairs whose nearest partitions differ"
        sims = y @ centroids.T
        flat = np.count_nonzero(sims.max(axis=1, keepdims=True) - sims <= 2 * core.border_margin(threshold))
        assert len(ay.rows) < flat, "tighter than a flat margin of 2 sqrt(2 - 2S) on the cosine"
    assert len(ay.rows) < len(y) * len(centroids) / 4, "at S = 0.99 most vectors stay in one or a few partitions"


def test_pairs_above_is_exact_in_small_blocks_and_counts_each_pair_once():
    rng = np.random.default_rng(1)
    x = core.unit_rows(rng.standard_normal((300, 8)))
    ids = rng.permutation(1000)[:300]
    sims = x @ x.T
    want = {(min(ids[i], ids[j]), max(ids[i], ids[j])) for i, j in zip(*np.nonzero(np.triu(sims >= 0.8, 1)))}
    got = core.pairs_above(x, ids, len(x), 0.8, block_floats=500)  # blocks of a row or two
    assert set(zip(got.left.tolist(), got.right.tolist())) == want and len(got.left) == len(want) > 100
    row = {int(i): r for r, i in enumerate(ids)}
    assert np.allclose(got.similarity, [x[row[a]] @ x[row[b]] for a, b in zip(got.left, got.right)], atol=1e-6)
    partial = core.pairs_above(x, ids, 100, 0.8)  # primaries first: pairs with one end among the first 100
    assert len(partial.left) == sum(1 for a, b in want if {a, b} & set(ids[:100].tolist()))


@pytest.mark.parametrize("dim", [64, 512])
def test_threshold_one_finds_every_exact_duplicate(dim):
    """Identical stored rows: their float32 cosine lands a few ulps either side of 1.0, by where they sit."""
    base = np.random.default_rng(dim).standard_normal((100, dim)).astype(np.float16)
    vectors = np.concatenate([base, base, np.random.default_rng(1).standard_normal((50, dim)).astype(np.float16)])
    pairs = core.pairs_above(vectors, np.arange(len(vectors)), len(vectors), 1.0, block_floats=2_000)
    assert sorted(zip(pairs.left.tolist(), pairs.right.tolist())) == [(i, i + 100) for i in range(100)]


@pytest.mark.parametrize("threshold", [1.0, 1.0 - 2e-6])
def test_no_pair_below_a_threshold_near_one(threshold):
    """Rows a hair apart (cosine 1 - 1e-6 .. 1 - 1e-5, not equal bytes) are not identical: at a threshold near 1 no
    reported pair is below it (before, every threshold above 1 - 1e-5 was compared at 1 - 1e-5)."""
    rng = np.random.default_rng(5)
    base = core.unit_rows(rng.standard_normal((200, 64)).astype(np.float32))
    nudge = rng.standard_normal(base.shape).astype(np.float32)
    near = core.unit_rows(
        base + nudge / np.linalg.norm(nudge, axis=1, keepdims=True) * rng.uniform(2e-3, 4e-3, (200, 1))
    )
    vectors = np.concatenate([base, near]).astype(np.float16)
    cos = core.row_cosines(vectors[:200], vectors[200:])
    assert ((cos < 1.0 - 1e-6) & (cos >= 1.0 - 1e-5)).sum() > 100  # the hair-apart pairs are there
    pairs = core.pairs_above(vectors, np.arange(400), 400, threshold, block_floats=4_000)
    assert (pairs.similarity >= np.float32(threshold)).all()
    assert len(pairs.left) < 50


def test_copies_are_compared_once_and_joined_to_their_lowest_id_in_their_primary_partition():
    x = np.random.default_rng(3).standard_normal((20, 32)).astype(np.float16)  # 10 primaries, then 10 border copies
    x[[5, 8]] = x[2]  # three copies among the primaries
    x[15] = x[12]  # two among the border copies: joined in their own primary partition, not here
    ids = np.arange(100, 120)
    pairs = core.pairs_above(x, ids, 10, 0.99)
    got = sorted(zip(pairs.left.tolist(), pairs.right.tolist(), pairs.similarity.tolist()))
    assert got == [(102, 105, 1.0), (102, 108, 1.0)]  # not (105, 108): one pair per copy, to the lowest id
    keep, n_primary, _ = core.collapse_copies(x, ids, 10)
    assert keep.tolist() == [0, 1, 2, 3, 4, 6, 7, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19] and n_primary == 8


def test_spanning_edges_keep_the_components_without_a_cycle():
    rng = np.random.default_rng(4)
    n = 500
    left, right = rng.integers(0, n, 3000), rng.integers(0, n, 3000)  # repeats, self-loops, many cycles
    picked = core.spanning_edges(n, left, right)
    all_roots = core.union_find_roots(n, left, right)
    assert np.array_equal(core.union_find_roots(n, left[picked], right[picked]), all_roots)
    assert len(picked) == n - len(np.unique(all_roots)), "a forest: one edge fewer than members, per component"
    assert len(core.spanning_edges(n, left[:0], right[:0])) == 0


ALL_PRIMARY = core.Border(0, np.eye(1, 64, dtype=np.float32), 0.0)  # one partition: no border member to ask about


def test_joining_pairs_keep_the_groups_of_every_pair_in_a_forest_and_count_every_pair():
    x, _ = with_near_duplicates(600, 32, fraction=0.2, clusters=2, seed=8)
    ids = np.random.default_rng(1).permutation(10_000)[:600]
    every = core.pairs_above(x, ids, len(x), 0.9, block_floats=3_000)
    got = core.joining_pairs(x, ids, len(x), 0.9, ALL_PRIMARY, block_floats=3_000)  # blocks of five rows
    assert got.found == len(every.left) > 100
    groups, joined = core.group_duplicates(every), core.group_duplicates(got.pairs)
    assert np.array_equal(joined.ids, groups.ids) and np.array_equal(joined.kept, groups.kept)
    assert len(got.pairs.left) == len(groups.ids), "one pair per member but the kept one"
    assert set(zip(got.pairs.left.tolist(), got.pairs.right.tolist())) <= set(
        zip(every.left.tolist(), every.right.tolist())
    )
    assert (got.pairs.similarity >= np.float32(0.9)).all()


def test_thousands_of_near_copies_hold_one_pair_each():
    """A placeholder re-encoded: 3,000 rows a hair apart (not equal bytes) make 4.5 M pairs >= S, kept as 2,999."""
    rng = np.random.default_rng(2)
    near = perturbed(
        np.repeat(rng.standard_normal((1, 64)).astype(np.float32), 3000, axis=0), rng.uniform(0.99, 1.0, 3000), rng
    )
    got = core.joining_pairs(near.astype(np.float16), np.arange(3000), 3000, 0.95, ALL_PRIMARY)
    assert got.found == 3000 * 2999 // 2
    assert len(got.pairs.left) == 2999 and core.group_duplicates(got.pairs).n_groups == 1


def test_each_pair_is_counted_in_one_partition_only():
    """x (id 7) nearest centroid 0, y (id 3) nearest 1, at cosine 0.999. At the exact margin each joins the other's
    partition, both find the pair and only y's (the lower id's) counts it. At a margin that lets y join 0 but not
    x join 1, only partition 0 finds it, and it counts it there."""
    centroids = np.eye(2, 16, dtype=np.float32)
    x, y = core.unit_rows(np.array([[1.0, 0.9], [0.95, 1.0]], np.float32) @ centroids)
    exact = core.border_margin(0.9)
    in_zero = core.joining_pairs(np.stack([x, y]), np.array([7, 3]), 1, 0.9, core.Border(0, centroids, exact))
    in_one = core.joining_pairs(np.stack([y, x]), np.array([3, 7]), 1, 0.9, core.Border(1, centroids, exact))
    assert (in_zero.found, in_one.found) == (0, 1)
    assert len(in_zero.pairs.left) == len(in_one.pairs.left) == 1, "both keep the pair for the groups"
    narrow = core.Border(0, centroids, 0.04)  # y's gap 0.036 < 0.04 sqrt 2 < x's gap 0.074
    assert core.assign_partitions(y[None], centroids, 0.04).partitions.tolist() == [0, 1]
    assert core.assign_partitions(x[None], centroids, 0.04).partitions.tolist() == [0]
    assert core.joining_pairs(np.stack([x, y]), np.array([7, 3]), 1, 0.9, narrow).found == 1


def test_counting_border_pairs_at_a_low_threshold_stays_within_a_few_blocks():
    """S = 0.01: half of all pairs qualify, and each primary-border pair whose count is asked about took two dim-long
    rows at once for the whole block (2,500 rows at dim 128: 700 MiB; 8 GB a block at dim 512)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    rows = core.unit_rows(rng.standard_normal((2500, 128)).astype(np.float32))
    centroids = core.unit_rows(rng.standard_normal((2, 128)).astype(np.float32))
    nearest = np.argmax(rows @ centroids.T, axis=1)
    rows, n_primary = rows[np.argsort(nearest, kind="stable")], int(np.count_nonzero(nearest == 0))
    ids, border = rng.permutation(2500), core.Border(0, centroids, core.border_margin(0.01))
    tracemalloc.start()
    got = core.joining_pairs(rows.astype(np.float16), ids, n_primary, 0.01, border)  # one block
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 48 * core.BLOCK_FLOATS, f"{peak / 2**20:.0f} MiB"  # 12 blocks of float32
    small = core.joining_pairs(rows.astype(np.float16), ids, n_primary, 0.01, border, block_floats=50_000)
    assert got.found == small.found > 500_000


def test_union_find_groups_chains_and_stars_under_their_lowest_id():
    pairs = core.Pairs(np.array([7, 3, 9, 20, 21]), np.array([9, 7, 12, 30, 30]), np.zeros(5, np.float32))
    groups = core.group_duplicates(pairs)
    assert dict(zip(groups.ids.tolist(), groups.kept.tolist())) == {7: 3, 9: 3, 12: 3, 30: 20, 21: 20}
    assert groups.n_groups == 2
    long_chain = np.arange(10_000)[::-1]  # a path whose roots must travel far: still one group under 0
    roots = core.union_find_roots(10_001, long_chain, long_chain + 1)
    assert (roots == 0).all()


def test_balance_spreads_cost_over_ranks():
    owner = core.balance(np.array([10, 1, 1, 1, 9, 1, 1]), 2)
    assert {int(owner[0]), int(owner[4])} == {0, 1}
    assert core.balance(np.array([5, 4]), 1).tolist() == [0, 0]


# --- the job on synthetic vectors ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """3000 clustered 64-d vectors, 8% of them copies (cosine 0.9..1 to their source, some copies of copies)."""
    vectors, labels = with_near_duplicates(3000, 64, fraction=0.08, clusters=3, seed=5)
    emb = write_emb_dir(tmp_path_factory.mktemp("dedup") / "emb", vectors, labels, shard_size=700)
    return emb, core.unit_rows(vectors.astype(np.float16))  # what the shards hold, as dedup reads it


def exact_groups(vectors: np.ndarray) -> tuple[core.Pairs, core.Groups]:
    pairs = core.pairs_above(vectors, np.arange(len(vectors)), len(vectors), THRESHOLD)
    return pairs, core.group_duplicates(pairs)


SPLIT = ("--partitions", "55")  # 3,000 vectors cost least as one partition (all pairs); these test the split


def dedup(emb: Path, out: Path, *extra: str, ranks: int = 1) -> subprocess.CompletedProcess:
    args = [str(BIN / "clip-hpc"), "dedup", str(emb), "--threshold", str(THRESHOLD), "--out", str(out), *extra]
    if ranks > 1:
        args = [str(BIN / "mpiexec"), "-n", str(ranks), *args]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **THREADS})


def table(out: Path) -> dict[str, list]:
    return pq.read_table(out / "duplicates.parquet").to_pydict()


@pytest.fixture(scope="module")
def one_rank(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dedup") / "one"
    proc = dedup(planted[0], out, *SPLIT)
    assert proc.returncode == 0, proc.stderr
    assert "duplicates in" in proc.stdout and proc.stderr == ""
    return out


def test_dedup_finds_the_pairs_of_exact_search_and_groups_them(planted, one_rank):
    emb, vectors = planted
    pairs, groups = exact_groups(vectors)
    found = table(one_rank)
    kept = dict(zip(found["id"], found["duplicate_of"]))
    recall = np.mean([kept.get(a, a) == kept.get(b, b) for a, b in zip(pairs.left.tolist(), pairs.right.tolist())])
    assert len(pairs.left) > 100 and recall >= 0.99
    # nothing below the threshold joined a group: the groups are exactly the components of the pairs >= S
    assert found["id"] == groups.ids.tolist() and found["duplicate_of"] == groups.kept.tolist()
    assert all(k < i for i, k in kept.items()), "the kept image is the lowest id of its group"
    want = np.einsum("ij,ij->i", vectors[groups.ids], vectors[groups.kept])
    assert np.allclose(found["similarity"], want, atol=1e-5)
    paths = EmbDir(emb).read_inputs()
    assert found["path"][:3] == [paths[i] for i in found["id"][:3]]
    record = json.loads((one_rank / "dedup.json").read_text())
    assert record["counts"] == {
        "vectors": 3000,
        "duplicates": len(groups.ids),
        "groups": groups.n_groups,
        "pairs": len(pairs.left),
    }
    assert record["threshold"] == THRESHOLD and record["partitions"] == record["partitioning"]["count"] == 55
    border = record["partitioning"]
    assert record["border"] == "auto" and border["exact_margin"] == core.border_margin(THRESHOLD)
    assert 0 < border["margin"] <= border["exact_margin"] and border["calibration_pairs"] >= 1000  # 2x its need
    assert set(record["timings"]) >= {"kmeans", "assign", "pairs", "merge", "total"}
    assert record["resumed"] == {"units": 0, "partitions": 0}
    assert not (one_rank / "work").exists(), "the work files are removed once the outputs are whole"


def test_by_default_a_small_set_is_one_partition_all_pairs(planted, one_rank, tmp_path):
    """3,000 vectors: all pairs (4.5 M products) cost less than 55 partitions with their borders: one is chosen."""
    proc = dedup(planted[0], tmp_path / "auto")
    assert proc.returncode == 0, proc.stderr
    assert table(tmp_path / "auto") == table(one_rank)
    record = json.loads((tmp_path / "auto" / "dedup.json").read_text())
    assert record["partitions"] is None and record["partitioning"]["count"] == 1
    assert record["partitioning"]["replication"] == 1.0


@pytest.mark.mpi
def test_two_ranks_give_the_same_output(planted, one_rank, tmp_path):
    proc = dedup(planted[0], tmp_path / "two", *SPLIT, ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("duplicates in") == 1, "one rank reports for the job"
    assert table(tmp_path / "two") == table(one_rank)
    two, one = (json.loads((d / "dedup.json").read_text()) for d in (tmp_path / "two", one_rank))
    assert two["counts"] == one["counts"] and two["ranks"] == 2 and one["ranks"] == 1


def test_rerun_says_done_and_refuses_other_settings(planted, one_rank):
    before = (one_rank / "duplicates.parquet").stat().st_mtime_ns
    again = dedup(planted[0], one_rank, *SPLIT)
    assert again.returncode == 0 and "already done" in again.stdout
    assert (one_rank / "duplicates.parquet").stat().st_mtime_ns == before
    other = dedup(planted[0], one_rank, "--partitions", "7")
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "--partitions 55" in other.stderr and "--partitions 7" in other.stderr
    exact = dedup(planted[0], one_rank, *SPLIT, "--border", "exact")
    assert exact.returncode == 2 and "--border auto" in exact.stderr and "--border exact" in exact.stderr


def test_the_exact_border_gives_the_same_groups_and_a_record_from_before_it_reads_as_exact(planted, one_rank, tmp_path):
    out = tmp_path / "exact"
    proc = dedup(planted[0], out, *SPLIT, "--border", "exact")
    assert proc.returncode == 0, proc.stderr
    assert table(out) == table(one_rank)
    record = json.loads((out / "dedup.json").read_text())
    auto = json.loads((one_rank / "dedup.json").read_text())
    assert record["partitioning"]["margin"] == core.border_margin(THRESHOLD) and record["border"] == "exact"
    assert record["partitioning"]["replication"] >= auto["partitioning"]["replication"]
    del record["border"]  # as written before --border existed: those runs used the exact margin
    (out / "dedup.json").write_text(json.dumps(record))
    again = dedup(planted[0], out, *SPLIT, "--border", "exact")
    assert again.returncode == 0 and "already done" in again.stdout


def test_an_interrupted_run_resumes_from_its_work_files(planted, one_rank, tmp_path):
    from clip_hpc.cluster.world import World
    from clip_hpc.subsets.dedup import DedupOptions, assign_units, centroids_for, dedup_embeddings, make_plan
    from clip_hpc.subsets.dedup_work import WorkDir

    options = DedupOptions(planted[0], tmp_path / "out", THRESHOLD, partitions=55)
    plan = make_plan(options)  # what a killed run left: its settings, centroids and the first two units assigned
    work, emb = WorkDir(options.out), EmbDir(options.emb_dir)
    centroids, border = centroids_for(work, emb, plan)
    assign_units(work, emb, plan.units[:2], centroids, border.margin)
    other = dedup(planted[0], options.out, *SPLIT, "--seed", "3")
    assert other.returncode == 2 and "an unfinished dedup" in other.stderr and "--seed 0" in other.stderr
    result = dedup_embeddings(options, World())
    assert result.resumed.units == 2 and result.resumed.partitions == 0, "units done before are not redone"
    assert json.loads((options.out / "dedup.json").read_text())["resumed"] == {"units": 2, "partitions": 0}
    assert table(options.out) == table(one_rank) and not result.already_done


@pytest.mark.parametrize("damage", ["older", "unreadable"])
def test_work_files_of_an_older_version_or_damaged_are_refused_in_one_line(planted, tmp_path, damage):
    """A work dir left by a dedup from before --border (work/centroids.npy, settings without "border", units
    assigned to 55 partitions) must not be resumed: this version trains other centroids (here one partition) and
    would mix them with the old units' files (before: a ValueError traceback, or silently wrong partitions)."""
    from clip_hpc.subsets.dedup import DedupOptions, assign_units, make_plan, rows_at, spherical_kmeans
    from clip_hpc.subsets.dedup_work import WorkDir

    out = tmp_path / "out"
    plan = make_plan(DedupOptions(planted[0], out, THRESHOLD, border="exact"))
    work, emb = WorkDir(out), EmbDir(planted[0])
    centroids = spherical_kmeans(core.unit_rows(rows_at(emb, plan.units, np.arange(2750))), 55, 0)
    assign_units(work, emb, plan.units[:2], centroids, core.border_margin(THRESHOLD))
    np.save(work.root / "centroids.npy", centroids)
    settings = json.loads(work.settings_path.read_text())
    del settings["border"]
    work.settings_path.write_text(json.dumps(settings) if damage == "older" else '{"threshold": 0.9')
    proc = dedup(planted[0], out, "--border", "exact")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot resume" in proc.stderr and "remove it" in proc.stderr
    assert not (out / "dedup.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--threshold", "1.5"), "--threshold is a cosine similarity in (0, 1]"),
        (("--partitions", "0"), "--partitions must be at least 1"),
    ],
)
def test_bad_settings_fail_in_one_line(planted, tmp_path, args, message):
    proc = run_cli("dedup", planted[0], "--out", tmp_path / "o", "--threshold", "0.9", *args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1


def test_a_damaged_record_fails_in_one_line(planted, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "dedup.json").write_text('{"format": "clip-hpc-dedup", "threshold": 0.9}')
    proc = run_cli("dedup", planted[0], "--out", out, "--threshold", "0.9")
    assert proc.returncode == 2 and "not a readable dedup record" in proc.stderr and proc.stderr.count("\n") == 1


def test_missing_emb_dir_fails_in_one_line(tmp_path):
    proc = run_cli("dedup", tmp_path / "nothing", "--out", tmp_path / "o", "--threshold", "0.9")
    assert proc.returncode == 2 and "no such embedding directory" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.mpi
def test_an_error_on_one_rank_stops_every_rank(planted, tmp_path):
    out = tmp_path / "out"
    blocked = out / "work" / "assign" / "unit-000001-0000.vec"  # rank 1 assigns unit 1: only it cannot write there
    blocked.mkdir(parents=True)
    proc = dedup(planted[0], out, *SPLIT, ranks=2)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "rank 1 failed: Is a directory" in lines[0] and "unit-000001-0000.vec" in lines[0]
    assert not (out / "dedup.json").exists()


def with_a_group(tmp_path: Path, group_of: Callable[[np.ndarray], np.ndarray]) -> tuple[Path, np.ndarray, np.ndarray]:
    """1,000 clustered 64-d vectors and the rows `group_of` them, shuffled over shards of 700: (EMB_DIR, the
    vectors in id order, each id's position before the shuffle)."""
    others, labels = with_near_duplicates(1000, 64, fraction=0.05, clusters=3, seed=6)
    group = group_of(others)
    order = np.random.default_rng(9).permutation(len(others) + len(group))  # the group spread over every shard
    vectors = np.concatenate([others, group])[order]
    emb = write_emb_dir(tmp_path / "emb", vectors, np.concatenate([labels, labels[:1].repeat(len(group))])[order], 700)
    return emb, vectors, order


def dense_groups(vectors: np.ndarray) -> tuple[int, core.Groups]:
    """Exact all-pairs search in one matrix, without `pairs_above`: how many pairs >= THRESHOLD, and their groups."""
    stored = core.unit_rows(vectors.astype(np.float16))
    cosines = stored @ stored.T
    left, right = np.nonzero(np.triu(cosines >= THRESHOLD, k=1))
    return len(left), core.group_duplicates(
        core.Pairs(left.astype(np.int64), right.astype(np.int64), cosines[left, right])
    )


def test_a_vector_stored_two_thousand_times_is_one_group_without_drawing_every_partition(tmp_path):
    """A placeholder image thousands of times in web data: its copies are compared once (before, 2000 copies were
    ~2M pairs, and 6,000 alone drew every centroid: 77 partitions each, 1.9 GB), and the groups stay exact."""
    emb, vectors, order = with_a_group(tmp_path, lambda others: np.repeat(others[:1], 2000, axis=0))
    proc = dedup(emb, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    _, groups = dense_groups(vectors)
    found = table(tmp_path / "out")
    assert found["id"] == groups.ids.tolist() and found["duplicate_of"] == groups.kept.tolist()
    kept = dict(zip(found["id"], found["duplicate_of"]))
    copy_ids = np.flatnonzero((order == 0) | (order >= 1000))  # ids are row positions
    assert len({kept.get(i, i) for i in copy_ids.tolist()}) == 1, "every copy in one group"
    record = json.loads((tmp_path / "out" / "dedup.json").read_text())
    assert record["counts"]["pairs"] < 10 * 3000  # the copies joined by one pair each, not 2000 * 1999 / 2


def test_two_thousand_near_copies_draw_one_partition_not_dozens(tmp_path):
    """A placeholder re-encoded: 2,000 rows a hair apart (cosine 0.985-0.999 to one source, no two equal). Before,
    they drew a centroid per 50 of them and each joined every one of those partitions (29 memberships per vector at
    the exact border, 2 M pairs held); the k-means sample is now cut to 50 rows a group, and each partition keeps a
    forest of pairs."""
    rng = np.random.default_rng(5)
    source = core.unit_rows(rng.standard_normal((1, 64)).astype(np.float32))
    near = perturbed(np.repeat(source, 2000, axis=0), rng.uniform(0.985, 0.999, 2000), rng)
    emb, vectors, _ = with_a_group(tmp_path, lambda others: near)
    proc = dedup(emb, tmp_path / "out", *SPLIT, "--border", "exact")  # the auto border alone keeps them apart
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "no FAISS warning: the cut sample trains the 55 partitions asked for"
    n_pairs, groups = dense_groups(vectors)
    found = table(tmp_path / "out")
    assert found["id"] == groups.ids.tolist() and found["duplicate_of"] == groups.kept.tolist()
    record = json.loads((tmp_path / "out" / "dedup.json").read_text())
    assert abs(record["counts"]["pairs"] - n_pairs) <= n_pairs // 1000  # every pair counted once (float32 ulps)
    assert record["partitioning"]["replication"] < 10 and record["partitioning"]["count"] == 55  # 29 before


def test_a_corrupt_shard_is_named(tmp_path):
    vectors, labels = with_near_duplicates(400, 64, clusters=2, seed=1)
    emb = write_emb_dir(tmp_path / "emb", vectors, labels, shard_size=100)
    with h5py.File(EmbDir(emb).shard_path(1), "r+") as f:  # bit-rot in one stored embedding
        f["embeddings"][0, 0] = np.nan
    proc = dedup(emb, tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "shard-000001.h5" in proc.stderr and "NaN" in proc.stderr


# --- real photos -----------------------------------------------------------------------------------------------
COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "stereo_motorcycle", "colorwheel", "logo")  # fmt: skip
# clip-hpc-demo (64 px, trained on coloured shapes) puts these copies at >= 0.95 of their photo and unrelated photos
# at <= 0.926: any threshold in 0.93..0.955 groups them exactly. Grey photos it cannot tell apart, and crops of 3%
# bring two unrelated crops to 0.940, so those are left out (README: Subsets: dedup).
PHOTO_THRESHOLD = 0.94


def write_photos(out: Path) -> dict[str, str]:
    """Each photo as PNG plus three copies: JPEG quality 20, half size, 2% cropped off each side; name -> original."""
    import skimage.data
    from PIL import Image

    out.mkdir(parents=True)
    original = {}
    for name in COLOUR_PHOTOS:
        pixels = getattr(skimage.data, name)()
        image = Image.fromarray(pixels[0] if isinstance(pixels, tuple) else pixels).convert("RGB")
        w, h = image.size
        image.save(out / f"{name}.png")
        image.save(out / f"{name}_q20.jpg", quality=20)
        image.resize((w // 2, h // 2), Image.BILINEAR).save(out / f"{name}_half.png")
        image.crop((w * 2 // 100, h * 2 // 100, w - w * 2 // 100, h - h * 2 // 100)).save(out / f"{name}_crop.png")
        original.update({f"{name}{s}": name for s in (".png", "_q20.jpg", "_half.png", "_crop.png")})
    return original


@pytest.mark.slow
def test_copies_of_real_photos_are_grouped_with_their_originals(tmp_path):
    original = write_photos(tmp_path / "photos")
    emb, out = tmp_path / "emb", tmp_path / "dedup"
    run_cli("embed", tmp_path / "photos", "--out", emb, "--model", "clip-hpc-demo", check=True, env=THREADS)
    proc = run_cli("dedup", emb, "--out", out, "--threshold", str(PHOTO_THRESHOLD), check=True, env=THREADS)
    assert "30 duplicates in 10 groups" in proc.stdout
    found = table(out)
    name = {i: Path(p).name for i, p in enumerate(EmbDir(emb).read_inputs())}
    for dup, kept in zip(found["id"], found["duplicate_of"]):
        assert original[name[dup]] == original[name[kept]], f"{name[dup]} grouped with {name[kept]}"
    assert sorted(original[name[i]] for i in found["duplicate_of"]) == sorted(list(COLOUR_PHOTOS) * 3)


# --- the sbatch script -----------------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.slow
def test_dedup_sbatch_on_two_tasks_matches_one_rank(planted, one_rank, tmp_path, slurm_cluster: SlurmCluster):
    cluster = slurm_cluster
    log = tmp_path / "dedup.log"
    job = cluster.sbatch(
        "--ntasks=2",
        "--cpus-per-task=1",
        f"--output={log}",
        ROOT / "slurm" / "dedup.sbatch",
        planted[0],
        "--threshold",
        str(THRESHOLD),
        "--out",
        tmp_path / "out",
    )
    info = cluster.wait(job, log=log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert table(tmp_path / "out") == table(one_rank)
    assert json.loads((tmp_path / "out" / "dedup.json").read_text())["ranks"] == 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
