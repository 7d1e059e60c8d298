"""MetadataStore: the id -> path table behind every search result and path filter."""

from __future__ import annotations

import sqlite3

import pytest

from clip_hpc.formats.metadata import MetadataStore, prefix_upper_bound


@pytest.fixture
def store(tmp_path):
    with MetadataStore(tmp_path / "meta.sqlite") as meta:
        meta.add([3, 1, 7, 10], ["a/x.jpg", "a/y.jpg", "b/z.jpg", "ab/w.jpg"], sizes=[1, 2, 3, 4])
        yield meta


def test_lookup_by_id(store):
    assert store.count() == 4
    assert store.path_of(7) == "b/z.jpg"
    assert store.path_of(2) is None
    assert store.paths_of([1, 2, 3]) == {1: "a/y.jpg", 3: "a/x.jpg"}
    assert store.record(10) == {"id": 10, "path": "ab/w.jpg", "size": 4, "mtime": None}
    assert store.all_ids() == [1, 3, 7, 10]


def test_paths_of_many_ids_crosses_sqlite_parameter_limit(tmp_path):
    with MetadataStore(tmp_path / "m.sqlite") as meta:
        meta.add(range(1200), [f"p{i}" for i in range(1200)])
        got = meta.paths_of(range(0, 2400, 2))
    assert len(got) == 600 and got[1198] == "p1198"


def test_prefix_is_a_prefix_not_a_pattern(store):
    assert sorted(store.ids_with_prefix("a/")) == [1, 3]
    assert sorted(store.ids_with_prefix("a")) == [1, 3, 10]
    assert store.ids_with_prefix("c") == []
    assert sorted(store.ids_with_prefix("")) == [1, 3, 7, 10]
    assert len(store.ids_with_prefix("a", limit=1)) == 1
    assert prefix_upper_bound("a/") == "a0"


def test_prefix_with_like_wildcards(tmp_path):
    with MetadataStore(tmp_path / "m.sqlite") as meta:
        meta.add([1, 2], ["x%_/1.jpg", "xab/2.jpg"])
        assert meta.ids_with_prefix("x%_") == [1]


def test_random_ids_are_distinct_members(tmp_path):
    with MetadataStore(tmp_path / "m.sqlite") as meta:
        meta.add(range(0, 3000, 3), [f"p{i}" for i in range(1000)])
        ids = meta.random_ids(50, seed=1)
        assert len(set(ids)) == 50 and all(i % 3 == 0 and 0 <= i < 3000 for i in ids)
        assert sorted(meta.random_ids(5000)) == meta.all_ids()


def test_readonly_store_refuses_writes(store, tmp_path):
    with MetadataStore(tmp_path / "meta.sqlite", readonly=True) as ro:
        assert ro.path_of(3) == "a/x.jpg"
        with pytest.raises(sqlite3.OperationalError):
            ro.add([99], ["nope"])


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf")])
def test_min_similarity_must_be_a_finite_number(tmp_path, threshold):
    """`search --min-similarity nan` matched nothing (SQLite binds NaN as NULL) and said nothing; the HTTP API
    already refuses a threshold that is not finite."""
    from clip_hpc.errors import UserError

    with MetadataStore(tmp_path / "meta.sqlite") as meta:
        meta.add([0, 1], ["/a.jpg", "/b.jpg"], captions=["a", "b"], similarities=[0.2, 0.5])
        assert meta.ids_matching(min_similarity=0.3) == [1]
        with pytest.raises(UserError, match="--min-similarity must be a finite number"):
            meta.ids_matching(min_similarity=threshold)
