"""EmbDir and the shard file: atomic writes, the one validity check, the typed summary and the manifest."""

import json
import re

import h5py
import numpy as np
import pytest

from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir, Manifest, file_sha256
from clip_hpc.formats.shard import ShardBatch, ShardError, read_shard, write_shard


def write(tmp_path, unit=0, n=5, start=0, failed=(), dim=8, model="m"):
    rng = np.random.default_rng(unit)
    ids = [i for i in range(start, start + n) if i not in failed]
    emb = rng.normal(size=(len(ids), dim)).astype(np.float16)
    return EmbDir(tmp_path).write_shard(
        unit,
        ShardBatch(
            embeddings=emb,
            ids=ids[::-1],
            paths=[f"/img/{i}.jpg" for i in ids[::-1]],
            failed_ids=list(failed),
            failed_paths=[f"/img/{i}.jpg" for i in failed],
            failed_reasons=["truncated: x"] * len(failed),
            attrs={"model": model, "pretrained": "none", "unit": unit, "unit_size": n},
        ),
    )


def write_inputs(tmp_path, n):
    (tmp_path / "inputs.txt").write_text("\n".join(f"/img/{i}.jpg" for i in range(n)) + "\n")


def test_round_trip_sorts_by_id_and_keeps_pairs(tmp_path):
    path = write(tmp_path, failed=(2,))
    shard = read_shard(path)
    assert shard.ids.tolist() == [0, 1, 3, 4]
    assert shard.paths == [f"/img/{i}.jpg" for i in (0, 1, 3, 4)]
    assert shard.failed_ids.tolist() == [2] and shard.failed_reasons == ["truncated: x"]
    assert shard.embeddings.dtype == np.float16 and shard.embeddings.shape == (4, 8)
    assert shard.attrs["format"] == "clip-hpc-shard" and shard.attrs["version"] == 1
    emb = EmbDir(tmp_path)
    assert emb.check_unit(0, 5, 5).problem is None
    assert "covers 5 of the 6" in emb.check_unit(0, 6, 6).problem
    assert not list(path.parent.glob(".*tmp*"))


def test_paths_and_unit_numbers_round_trip(tmp_path):
    emb = EmbDir(tmp_path)
    assert emb.shard_path(12) == tmp_path / "shards" / "shard-000012.h5"
    assert emb.unit_of(emb.shard_path(12)) == 12
    assert not emb.looks_like_one()
    emb.write_inputs(["/a.jpg", "/b.jpg"])
    assert emb.read_inputs() == ["/a.jpg", "/b.jpg"] and emb.looks_like_one()
    assert (tmp_path / "inputs.txt").read_text() == "/a.jpg\n/b.jpg\n" and not list(tmp_path.glob(".*tmp*"))


def test_truncated_and_partial_files_do_not_validate(tmp_path):
    path = write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    emb = EmbDir(tmp_path)
    assert "unreadable" in emb.check_unit(0, 5, 5).problem
    other = write(tmp_path, unit=1, start=5)
    with h5py.File(other, "a") as f:
        del f["paths"]
    check = emb.check_unit(1, 5, 5)
    assert "missing" in check.problem and "dataset 'paths' is missing" in check.problem and not check.missing
    with pytest.raises(ShardError):
        read_shard(other)


# --- the one validity check: every kind of bad shard, and every caller agreeing on it ----------------------------
def _set_attr(name, value):
    def damage(path):
        with h5py.File(path, "r+") as f:
            f.attrs[name] = value

    return damage


def _replace_dataset(name, values):
    def damage(path):
        with h5py.File(path, "r+") as f:
            del f[name]
            f.create_dataset(name, data=values)

    return damage


def _truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def _other_unit(path):
    write_shard(
        path,
        ShardBatch(
            embeddings=np.zeros((5, 8), np.float16),
            ids=range(5),
            paths=list("abcde"),
            attrs={"model": "m", "pretrained": "none", "unit": 0, "unit_size": 5},
        ),
    )


BAD_SHARDS = [  # (damage to unit 1 of a 2-unit, 10-id EMB_DIR, what the reason says)
    (lambda path: path.unlink(), "missing"),
    (_truncate, "unreadable shard"),
    (_set_attr("format", "other"), "not a clip-hpc shard"),
    (_set_attr("version", 2), "unsupported shard version 2"),
    (_replace_dataset("failed_reasons", np.array([b"x"])), "failed_* datasets differ in length"),
    (_set_attr("n", 4), "5 embeddings but 5 ids"),
    (_set_attr("dim", 16), "attrs say 16"),
    (_replace_dataset("ids", np.array([5, 6, 8, 7, 9])), "not strictly ascending"),
    (_set_attr("unit", 3), "holds unit 3, expected 1"),
    (_other_unit, "holds unit 0, expected 1"),
    (_replace_dataset("ids", np.array([5, 6, 7, 8, 19])), "ids outside unit 1 range [5, 10)"),
    (_set_attr("unit_size", 4), "unit_size 4 differs from 5"),
]


@pytest.mark.parametrize("damage, reason", BAD_SHARDS)
def test_every_bad_shard_gets_a_reason_naming_its_file_and_every_check_agrees(tmp_path, damage, reason):
    write_inputs(tmp_path, 10)
    write(tmp_path, unit=0)
    path = write(tmp_path, unit=1, start=5)
    damage(path)
    emb = EmbDir(tmp_path)
    check = emb.check_unit(1, 5, 5)
    assert not check.ok and reason in check.problem and str(path) in check.problem
    assert check.missing == (reason == "missing")
    summary = emb.summarise(2, 5)
    assert not summary.complete and [e.unit for e in summary.shards] == [0]
    assert summary.missing_units == ([1] if check.missing else [])
    assert summary.invalid_shards == ([] if check.missing else [check.problem])
    with pytest.raises(ShardError, match="missing units \\[1\\]" if check.missing else "^" + re.escape(str(path))):
        emb.check_set()
    assert emb.write_manifest(2, 5) is None and emb.load_manifest() is None


def test_a_short_shard_does_not_cover_its_unit(tmp_path):
    write_inputs(tmp_path, 10)
    path = write(tmp_path, unit=0, n=4)
    problem = EmbDir(tmp_path).check_unit(0, 5, 5).problem
    assert problem == f"{path}: covers 4 of the 5 ids of unit 0"


# --- summary, manifest, the shard set --------------------------------------------------------------------------
def test_manifest_only_when_every_unit_is_whole(tmp_path):
    write_inputs(tmp_path, 10)
    write(tmp_path, unit=0)
    emb = EmbDir(tmp_path)
    assert emb.write_manifest(2, 5) is None
    write(tmp_path, unit=1, start=5, failed=(7,))
    stale = emb.shard_path(0).with_name(".shard-000000.h5.tmp.999")
    stale.write_bytes(b"left by a killed writer")
    manifest = emb.write_manifest(2, 5)
    assert manifest.n_embedded == 9 and manifest.n_failed == 1
    assert manifest.failed_by_reason == {"truncated": 1}
    assert manifest.inputs_sha256 == file_sha256(tmp_path / "inputs.txt")
    ids = np.concatenate([s.ids for s in emb.iter_shards()])
    assert ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert not stale.exists()
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest.to_dict() and emb.load_manifest() == manifest
    assert on_disk["shards"][1] == {"file": "shard-000001.h5", "unit": 1, "n": 4, "n_failed": 1}
    assert on_disk["format"] == "clip-hpc-shard-manifest" and Manifest.from_dict(on_disk) == manifest


@pytest.mark.parametrize("text", ["{not json", "", "[]", "null", '{"shards": [{"unit": 0}]}', "\udcff"])
def test_a_damaged_manifest_is_a_one_line_error(tmp_path, text):
    (tmp_path / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError, match="manifest.json: unreadable manifest .*re-run clip-hpc embed"):
        EmbDir(tmp_path).load_manifest()


def test_shard_set_check_rejects_mixed_models(tmp_path):
    write_inputs(tmp_path, 10)
    write(tmp_path, unit=0)
    write(tmp_path, unit=1, start=5, model="other")
    with pytest.raises(ShardError, match="mix models"):
        EmbDir(tmp_path).check_set()


def test_shard_set_check_rejects_a_shard_that_does_not_cover_its_unit(tmp_path):
    write_inputs(tmp_path, 12)
    write(tmp_path, unit=0)
    write(tmp_path, unit=1, start=5)  # the inputs grew (--append): unit 1 now spans ids 5..9, unit 2 is 10..11
    emb = EmbDir(tmp_path)
    with pytest.raises(ShardError, match="missing units \\[2\\]"):
        emb.check_set()
    write_inputs(tmp_path, 8)
    with pytest.raises(ShardError, match="ids outside unit 1"):
        emb.check_set()
    write_inputs(tmp_path, 10)
    summary = emb.check_set()
    assert summary.n_embedded == 10 and summary.complete and [e.unit for e in summary.shards] == [0, 1]


def test_sample_ids_draws_from_every_shard_without_repeats(tmp_path):
    write_inputs(tmp_path, 10)
    write(tmp_path, unit=0, failed=(3,))
    write(tmp_path, unit=1, start=5)
    emb = EmbDir(tmp_path)
    entries = emb.check_set().shards
    assert emb.shard_ids(0).tolist() == [0, 1, 2, 4]
    every = emb.sample_ids(entries, 100, np.random.default_rng(0))
    assert sorted(every.tolist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    some = emb.sample_ids(entries, 4, np.random.default_rng(1))
    assert len(set(some.tolist())) == 4 and set(some.tolist()) <= set(every.tolist())


def test_manifest_leaves_a_live_writers_temporary_shard_alone(tmp_path):
    """Two runs on one EMB_DIR (a requeued job overlapping its predecessor): the one that completes the set must not
    delete the temporary shard another live process is about to rename, which failed that run with ENOENT."""
    import socket
    import subprocess
    import sys

    from clip_hpc.formats.atomic import temp_path

    write_inputs(tmp_path, 10)
    write(tmp_path, unit=0)
    write(tmp_path, unit=1, start=5)
    emb = EmbDir(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = temp_path(emb.shard_path(1), pid=live.pid)
        alive.write_bytes(b"being written")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        gone = temp_path(emb.shard_path(0), pid=dead.pid)
        gone.write_bytes(b"left by a killed writer")
        elsewhere = temp_path(emb.shard_path(0), pid=live.pid, host="other-" + socket.gethostname())
        elsewhere.write_bytes(b"another node's writer: alive or not, this node cannot tell")
        assert emb.write_manifest(2, 5) is not None
        assert alive.exists() and elsewhere.exists() and not gone.exists()
        assert [p.name for p in emb.shard_files()] == ["shard-000000.h5", "shard-000001.h5"]
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize(
    "wanted, flag",
    [
        ({"unit_size": 4}, "--shard-size 5"),
        ({"model": "other"}, "--model m"),
        ({"dtype": "float32"}, "--dtype float16"),
        ({"precision": "bf16"}, "--precision fp32"),
    ],
)
def test_a_run_with_other_settings_is_refused_naming_the_recorded_one(tmp_path, wanted, flag):
    """A re-run with another unit size, model or dtype re-embedded every unit (or mixed two dtypes under one manifest);
    now it is one line naming what the EMB_DIR was made with. Shards from before `precision` was recorded pass."""
    from clip_hpc.errors import UserError

    same = {"model": "m", "pretrained": "none", "unit_size": 5, "dtype": "float16", "precision": "fp32"}
    emb = EmbDir(tmp_path)
    emb.refuse_other_settings({**same, **wanted})  # an empty EMB_DIR takes any settings
    write_inputs(tmp_path, 10)
    emb.write_shard(
        0,
        ShardBatch(
            embeddings=np.zeros((5, 8), np.float16),
            ids=list(range(5)),
            paths=list("abcde"),
            attrs={**same, "pretrained": "none"},
        ),
    )
    emb.refuse_other_settings(same)
    with pytest.raises(UserError, match=f"made with {flag}.*use a new --out"):
        emb.refuse_other_settings({**same, **wanted})
    if "precision" in wanted:
        write(tmp_path, unit=0)  # no precision attr: an older shard
        emb.refuse_other_settings({**same, **wanted})
