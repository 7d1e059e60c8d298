"""formats/shard_columns.py: the filter scan's columns, read by plain file reads where HDF5 stores them contiguously."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from clip_hpc.formats.shard import ShardBatch, ShardError, write_shard
from clip_hpc.formats.shard_columns import backing_buffer, read_scan_columns
from clip_hpc.formats.span_read import scratch


def shard(tmp_path, n: int, dim: int = 16, *, captions: bool = False):
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, dim)).astype(np.float16)
    ids = np.arange(100, 100 + 2 * n, 2)
    extra = {}
    if captions:
        similarity = rng.uniform(-1, 1, n).astype(np.float32)
        similarity[::3] = np.nan  # rows without a caption
        extra = {"caption_embeddings": vectors.copy(), "similarity": similarity, "captions": ["c"] * n}
    batch = ShardBatch(vectors, ids, [f"/x/{i}.jpg" for i in ids], attrs={"model": "m", "dim": dim}, **extra)
    return write_shard(tmp_path / f"shard-{n}.h5", batch)


@pytest.mark.parametrize("captions", [False, True])
def test_the_columns_equal_what_h5py_reads_and_a_spare_buffer_is_reused(tmp_path, captions):
    path = shard(tmp_path, 300, captions=captions)
    with h5py.File(path, "r") as f:
        ids, vectors = f["ids"][...], f["embeddings"][...]
        similarity = f["similarity"][...].astype(np.float32) if captions else None
    spare = scratch(500 * 16 * 2)
    got = read_scan_columns(path, into=spare)
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_array_equal(got.embeddings, vectors)
    assert np.shares_memory(got.embeddings, spare) and got.embeddings.dtype == np.float16
    if captions:
        np.testing.assert_array_equal(got.similarity, similarity)  # NaN where no caption, in place
        assert got.similarity.dtype == np.float32
    else:
        assert got.similarity is None
    assert not np.shares_memory(read_scan_columns(path, into=scratch(10 * 16 * 2)).embeddings, spare)
    assert backing_buffer(got.embeddings) is spare  # the reader's next turn reads into it again


def test_an_empty_shard_and_a_truncated_one(tmp_path):
    empty = read_scan_columns(shard(tmp_path, 0))
    assert len(empty.ids) == 0 and empty.embeddings.shape[0] == 0
    path = shard(tmp_path, 200)
    data = path.read_bytes()
    with h5py.File(path, "r") as f:
        end = f["embeddings"].id.get_offset() + f["embeddings"].id.get_storage_size()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: end - 100])  # the header is whole, the vectors are not
    for around in (False, True):
        with pytest.raises(ShardError, match=r"cut\.h5: (unreadable|truncated) shard"):  # HDF5 checks its end first
            read_scan_columns(cut, around_cache=around)
