"""IVF-SQ8 in the built index's lists (ann/fine_ivf.py, index/candidates.py): its rows, lists and ids, the nprobe
ladder it is priced on, and the self-check serving it where it is the fastest setting that holds the bound."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from clip_hpc.ann.fine_ivf import FINE_LABEL, build_fine_ivf, fine_bytes, fine_key, fine_ladder
from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k, without_own
from clip_hpc.ann.rows import add_embedded_rows
from clip_hpc.devdata import synthetic_vectors as synthetic
from clip_hpc.index.candidates import list_coverage
from clip_hpc.index.check_queries import check_queries
from clip_hpc.index.selfcheck import self_check
from clip_hpc.index.tuning import TARGET_RECALL


@pytest.fixture(scope="module")
def built():
    """3,000 rows at d=32 (three never embedded) in an IVF64 fast-scan PQ index of 4 sub-quantizers: codes so coarse
    that recall needs a long exact re-rank."""
    vectors, _ = synthetic.gaussian_mixture(3000, 32, 20, latent=8, seed=3)
    stored = vectors.astype(np.float16)
    stored[[5, 700, 2999]] = 0
    index = faiss.index_factory(32, "IVF64,PQ4x4fs", faiss.METRIC_INNER_PRODUCT)
    index.train(stored.astype(np.float32))
    add_embedded_rows(index, stored)
    return stored, index


def list_ids(index: faiss.Index, number: int) -> set[int]:
    invlists = faiss.extract_index_ivf(index).invlists
    size = invlists.list_size(number)
    return set(faiss.rev_swig_ptr(invlists.get_ids(number), size).tolist()) if size else set()


def test_the_fine_index_holds_every_embedded_row_in_the_built_index_own_lists(built):
    stored, index = built
    fine = build_fine_ivf(index, stored)
    assert isinstance(fine, faiss.IndexIVFScalarQuantizer) and fine.ntotal == len(stored) - 3
    assert fine.nlist == 64 and fine.code_size == 32  # a byte a dimension
    centroids = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 64)
    assert np.array_equal(fine.quantizer.reconstruct_n(0, 64), centroids)  # the same coarse quantizer, no k-means
    assert all(list_ids(fine, n) == list_ids(index, n) for n in range(64))  # every row in the list it has there
    assert not any({5, 700, 2999} & list_ids(fine, n) for n in range(64))
    fine.nprobe = 64
    queries = stored[[1, 800, 2500]].astype(np.float32)
    assert fine.search(queries, 1)[1][:, 0].tolist() == [1, 800, 2500]  # global ids
    assert fine_bytes(1000, 512, 64) == 1000 * 520 + 4 * 512 * 64 and fine_key(64) == "IVF64,SQ8"


def test_the_ladder_doubles_with_halfway_steps_up_to_every_list():
    assert fine_ladder(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert fine_ladder(1) == [1] and fine_ladder(100)[-1] == 100 and max(fine_ladder(100)[:-1]) < 100
    assert fine_ladder(512) == sorted(set(fine_ladder(512)))


def test_the_self_check_serves_the_fine_index_where_it_is_the_fastest_setting_that_holds_the_bound(built):
    stored, index = built
    ids = np.random.default_rng(0).choice(np.flatnonzero(stored.any(axis=1)), 400, replace=False)
    report = self_check(index, stored, ids, refine_factor=None, refine=True, nprobe=None, fine_allowed=True)
    timing = report.timing
    assert timing is not None
    fines = [c for c in timing["candidates"] if c["label"].startswith(FINE_LABEL)]
    assert len(fines) == 1 and fines[0]["bound"] >= TARGET_RECALL
    label = fines[0]["label"]  # sq8,nprobeP,refineF: the least nprobe, then the least factor, reaching the target
    probe, factor = (int(part.removeprefix("nprobe").removeprefix("refine")) for part in label.split(",")[1:])
    bounds = report.tuning_lower_bounds
    assert bounds[label] == fines[0]["bound"]
    assert all(b < TARGET_RECALL for key, b in bounds.items() if key.startswith(f"{FINE_LABEL},nprobe")
               and int(key.split(",")[1].removeprefix("nprobe")) < probe)  # fmt: skip
    times = {c["label"]: c["p50_ms"] for c in timing["candidates"] if c["kind"] == "approximate"}
    assert times[timing["chosen"]] == min(times.values())  # exact search is timed, not allowed here
    if timing["chosen"] != label:  # the PQ codes' re-rank of ~1,000 rows was faster here: nothing replaced
        assert report.replacement is None and report.replacement_key is None
        return
    assert report.replacement_key == fine_key(64) and report.nprobe == probe
    assert report.replacement_refines == (factor > 0) and (factor == 0 or report.refine_factor == factor)
    assert report.served_bound == fines[0]["bound"] and report.target_met
    fine = report.replacement
    fine.nprobe = probe
    queries = stored[np.random.default_rng(1).choice(len(stored), 100)].astype(np.float32) + 0.05
    found = fine.search(queries, 10)[1]
    assert recall_at_k(found, exact_top_k(queries, stored.astype(np.float32), 10), 10) >= 0.9


def test_without_a_fine_candidate_nothing_is_priced_under_its_label(built):
    stored, index = built
    ids = np.random.default_rng(0).choice(np.flatnonzero(stored.any(axis=1)), 200, replace=False)
    report = self_check(index, stored, ids, refine_factor=None, refine=True, nprobe=None)
    assert not any(key.startswith(FINE_LABEL) for key in report.tuning_lower_bounds)
    assert report.replacement_key is None


def test_list_coverage_is_the_share_of_true_neighbours_in_the_probed_lists(built):
    stored, index = built
    ivf = faiss.extract_index_ivf(index)
    ids = np.random.default_rng(2).choice(np.flatnonzero(stored.any(axis=1)), 60, replace=False)
    tune, _ = check_queries(stored, ids, np.random.default_rng(3), None)
    coverage = list_coverage(ivf, stored, tune, [1, 4, 16, 64])
    assert coverage.shape == (len(tune.queries), 4)
    assert np.all(np.diff(coverage, axis=1) >= 0) and np.all(coverage[:, -1] == 1.0)  # every list: all of them
    q = 7  # one query by hand: its true neighbours' lists against its 4 nearest lists
    _, probed = ivf.quantizer.search(tune.queries[q : q + 1], 4)
    homes = ivf.quantizer.assign(stored[tune.truth.ids[q]].astype(np.float32), 1).ravel()
    assert coverage[q, 1] == np.isin(homes, probed[0]).mean()
    # the fine index never finds more than its lists hold: recall at nprobe 4 is at most the coverage there
    fine = build_fine_ivf(index, stored)
    fine.nprobe = 4
    found = fine.search(tune.queries, 10)[1]
    assert recall_at_k(without_own(found, tune.own), tune.truth.ids, 10) <= coverage[:, 1].mean() + 1e-9
