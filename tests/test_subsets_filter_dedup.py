"""`clip-hpc filter --dedup S`: the subset less every image that has a lower-id near-duplicate in it, checked
against all pairs written out directly, on the real embedded set and on planted copies across many partitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_hpc.errors import UserError
from clip_hpc.subsets import FilterOptions
from clip_hpc.subsets.dedup import spherical_kmeans
from clip_hpc.subsets.dedup_core import border_margin, duplicates_in, unit_rows
from clip_hpc.subsets.dedup_margin import calibrated_margins
from clip_hpc.subsets.subset_dedup import units_holding
from subsets_fixtures import Source, mixed_source  # noqa: F401  (the fixture)
from test_subsets_filter import kept_scores, run_filter


def brute_force_duplicates(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> set[int]:
    """Every id with a path of pairs >= threshold to a lower id: connected components by repeated relaxation."""
    rows = unit_rows(vectors)
    order = np.argsort(ids)
    ids, rows = ids[order], rows[order]
    linked = rows @ rows.T >= threshold
    np.fill_diagonal(linked, True)
    root = np.arange(len(ids))
    while True:  # label propagation: each row takes the lowest label among its neighbours; labels only fall
        lowest = np.array([root[linked[i]].min() for i in range(len(ids))])
        if (lowest == root).all():
            break
        root = lowest
    return {int(ids[i]) for i in range(len(ids)) if root[i] != i}


def test_duplicates_in_equals_all_pairs_across_many_partitions() -> None:
    rng = np.random.default_rng(7)
    base = unit_rows(rng.normal(size=(600, 32)).astype(np.float32))
    copies = unit_rows(base[:150] + rng.normal(scale=0.04, size=(150, 32)).astype(np.float32))
    vectors = np.concatenate([base, copies])
    ids = rng.permutation(10_000)[: len(vectors)].astype(np.int64)
    expected = brute_force_duplicates(ids, vectors, 0.97)
    assert 100 < len(expected) < 300  # the planted copies, not everything
    order = np.argsort(ids)
    for k in (1, 12):  # one partition (exact all-pairs), and many with border copies
        centroids = spherical_kmeans(unit_rows(vectors[order]), k, seed=0)
        (auto,) = calibrated_margins(unit_rows(vectors), [centroids], 0.97)  # what filter --dedup uses
        assert auto.margin <= border_margin(0.97)
        for margin in (None, auto.margin):  # None: the exact border
            groups = duplicates_in(vectors[order], ids[order], centroids, 0.97, margin)
            assert set(groups.ids.tolist()) == expected, (k, margin)
            assert (groups.kept < groups.ids).all()


def test_filter_dedup_drops_exactly_the_lower_id_duplicates(mixed_source: Source, tmp_path) -> None:
    plain = run_filter(mixed_source, tmp_path / "plain", texts=("a red kite",), threshold=-1.0)
    ids, vectors, _, _ = mixed_source.stored()
    picked = np.isin(ids, list(plain))
    sims = unit_rows(vectors[picked]) @ unit_rows(vectors[picked]).T
    threshold = float(np.quantile(sims[np.triu_indices(len(sims), 1)], 0.97))  # some pairs above it, not all
    expected_gone = brute_force_duplicates(ids[picked], vectors[picked], threshold)
    assert 0 < len(expected_gone) < len(plain)
    found = run_filter(mixed_source, tmp_path / "dedup", texts=("a red kite",), threshold=-1.0, dedup=threshold)
    assert set(found) == set(plain) - expected_gone
    assert all(abs(found[i] - plain[i]) < 1e-6 for i in found)
    report = json.loads((tmp_path / "dedup" / "filter.json").read_text())
    assert report["dedup"] == threshold and report["counts"]["duplicates_dropped"] == len(expected_gone)
    assert sorted(kept_scores(tmp_path / "dedup")) == sorted(found)
    assert (tmp_path / "dedup" / "paths.txt").read_text().count("\n") <= len(found)


@pytest.mark.parametrize("dedup", [1.5, -1.0, float("nan")])
def test_filter_dedup_refuses_a_threshold_that_is_not_a_cosine(dedup: float) -> None:
    with pytest.raises(UserError, match="--dedup"):
        FilterOptions("e", "o", texts=("x",), threshold=0.1, dedup=dedup).check()


def test_only_the_units_that_hold_kept_ids_are_read_again() -> None:
    spans = [(0, 0, 7), (1, 8, 15), (2, 16, 23), (4, 32, 39)]  # unit 3 had no rows
    assert units_holding(np.array([3, 17], np.int64), spans) == [0, 2]
    assert units_holding(np.array([8, 15, 39], np.int64), spans) == [1, 4]  # the ends of a span count
    assert units_holding(np.array([24, 30], np.int64), spans) == []
