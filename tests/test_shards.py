import h5py
import numpy as np
import pytest

from clip_hpc import shards


def write(tmp_path, unit=0, n=5, start=0, failed=(), dim=8, model="m"):
    rng = np.random.default_rng(unit)
    ids = [i for i in range(start, start + n) if i not in failed]
    emb = rng.normal(size=(len(ids), dim)).astype(np.float16)
    return shards.write_shard(shards.shard_path(tmp_path, unit), embeddings=emb, ids=ids[::-1],
                              paths=[f"/img/{i}.jpg" for i in ids[::-1]], failed_ids=list(failed),
                              failed_paths=[f"/img/{i}.jpg" for i in failed], failed_reasons=["truncated: x"] * len(failed),
                              attrs={"model": model, "pretrained": "none", "unit": unit, "unit_size": n})


def test_round_trip_sorts_by_id_and_keeps_pairs(tmp_path):
    path = write(tmp_path, failed=(2,))
    shard = shards.read_shard(path)
    assert shard.ids.tolist() == [0, 1, 3, 4]
    assert shard.paths == [f"/img/{i}.jpg" for i in (0, 1, 3, 4)]
    assert shard.failed_ids.tolist() == [2] and shard.failed_reasons == ["truncated: x"]
    assert shard.embeddings.dtype == np.float16 and shard.embeddings.shape == (4, 8)
    assert shard.attrs["format"] == "clip-hpc-shard" and shard.attrs["version"] == 1
    assert shards.validate_shard(path, unit=0, unit_size=5, n_ids=5) is None
    assert "covers 5 of the 6" in shards.validate_shard(path, unit=0, unit_size=6, n_ids=6)
    assert not list(path.parent.glob(".*tmp*"))


def test_truncated_and_partial_files_do_not_validate(tmp_path):
    path = write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "unreadable" in shards.validate_shard(path)
    other = write(tmp_path, unit=1, start=5)
    with h5py.File(other, "a") as f:
        del f["paths"]
    assert "missing" in shards.validate_shard(other)
    with pytest.raises(shards.ShardError):
        shards.read_shard(other)


def test_manifest_only_when_every_unit_is_whole(tmp_path):
    (tmp_path / "inputs.txt").write_text("\n".join(f"/img/{i}.jpg" for i in range(10)) + "\n")
    write(tmp_path, unit=0)
    assert shards.write_manifest(tmp_path, 2, 5) is None
    write(tmp_path, unit=1, start=5, failed=(7,))
    manifest = shards.write_manifest(tmp_path, 2, 5)
    assert manifest["n_embedded"] == 9 and manifest["n_failed"] == 1
    assert manifest["failed_by_reason"] == {"truncated": 1}
    assert manifest["inputs_sha256"] == shards.file_sha256(tmp_path / "inputs.txt")
    ids = np.concatenate([s.ids for s in shards.iter_shards(tmp_path)])
    assert ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]


def test_shard_set_check_rejects_mixed_models(tmp_path):
    (tmp_path / "inputs.txt").write_text("\n".join(f"/img/{i}.jpg" for i in range(10)) + "\n")
    write(tmp_path, unit=0)
    write(tmp_path, unit=1, start=5, model="other")
    with pytest.raises(shards.ShardError, match="mix models"):
        shards.check_shard_set(tmp_path)


def test_shard_set_check_rejects_a_shard_that_does_not_cover_its_unit(tmp_path):
    (tmp_path / "inputs.txt").write_text("\n".join(f"/img/{i}.jpg" for i in range(12)) + "\n")
    write(tmp_path, unit=0)
    write(tmp_path, unit=1, start=5)  # the inputs grew (--append): unit 1 now spans ids 5..9, unit 2 is 10..11
    with pytest.raises(shards.ShardError, match="missing units \\[2\\]"):
        shards.check_shard_set(tmp_path)
    (tmp_path / "inputs.txt").write_text("\n".join(f"/img/{i}.jpg" for i in range(8)) + "\n")
    with pytest.raises(shards.ShardError, match="ids outside unit 1"):
        shards.check_shard_set(tmp_path)
    (tmp_path / "inputs.txt").write_text("\n".join(f"/img/{i}.jpg" for i in range(10)) + "\n")
    assert shards.check_shard_set(tmp_path)["n"] == 10
