"""subsets/scan.py's reader: shards read ahead by a thread into two buffers that take turns, the pair given by a GPU
scan (pinned memory) or made from the first two shards."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from clip_hpc.formats.shard import ShardBatch, write_shard
from clip_hpc.formats.span_read import scratch
from clip_hpc.subsets.options import goes_around_cache
from clip_hpc.subsets.scan import read_ahead
from clip_hpc.subsets.scoring import pinned_buffers


def shards(tmp_path, sizes: list[int], dim: int = 8) -> list[str]:
    paths, first = [], 0
    for i, n in enumerate(sizes):
        vectors = np.random.default_rng(i).standard_normal((n, dim)).astype(np.float16)
        ids = np.arange(first, first + n)
        first += n
        batch = ShardBatch(vectors, ids, [f"/x/{j}.jpg" for j in ids], attrs={"model": "m", "dim": dim})
        paths.append(str(write_shard(tmp_path / f"shard-{i:06d}.h5", batch)))
    return paths


def stored(path: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["embeddings"][...]


@pytest.mark.parametrize("given", [False, True])
def test_every_shard_arrives_whole_and_two_buffers_take_turns(tmp_path, given):
    paths = shards(tmp_path, [40, 25, 40, 0, 33, 20])  # an empty shard does not cost the pair a buffer
    pair = (scratch(40 * 8 * 2), scratch(40 * 8 * 2)) if given else None
    seen = []
    for i, (path, columns) in enumerate(read_ahead(paths, pair)):
        assert path == paths[i]
        np.testing.assert_array_equal(columns.embeddings, stored(path))  # before the reader reuses the buffer
        seen.append(columns.embeddings)
        if pair is not None and len(columns.embeddings):
            assert np.shares_memory(columns.embeddings, pair[i % 2]), i  # the given pair, from the first shard on
    if not given:  # the first two shards' own arrays are the pair: the third and fifth reuse the first's
        assert np.shares_memory(seen[2], seen[0]) and np.shares_memory(seen[4], seen[0])
        assert not np.shares_memory(seen[1], seen[0])


def test_a_pair_too_small_for_a_shard_gives_that_shard_its_own_array(tmp_path):
    paths = shards(tmp_path, [10, 30])
    pair = (scratch(10 * 8 * 2), scratch(10 * 8 * 2))
    got = [
        (c.embeddings.copy(), np.shares_memory(c.embeddings, pair[i]))
        for i, (_, c) in enumerate(read_ahead(paths, pair))
    ]
    np.testing.assert_array_equal(got[0][0], stored(paths[0]))
    np.testing.assert_array_equal(got[1][0], stored(paths[1]))
    assert [shared for _, shared in got] == [True, False]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_there_is_no_pinned_pair_and_the_scan_reads_into_its_own():
    assert pinned_buffers(100 * 8 * 2) is None


def test_auto_reads_around_the_cache_only_for_more_than_half_the_memory():
    assert not goes_around_cache("auto", 50, 100) and goes_around_cache("auto", 51, 100)
    assert goes_around_cache("bypass", 1, 100) and not goes_around_cache("use", 10**12, 100)
    with pytest.raises(ValueError, match="one of auto, use, bypass"):
        goes_around_cache("direct", 1, 100)
