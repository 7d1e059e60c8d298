"""IndexDir: the one owner of INDEX_DIR's file names, index.json (IndexInfo), opening the files, the swap-in."""

import json
import re
import socket
import subprocess
from pathlib import Path

import faiss
import numpy as np
import pytest

from clip_hpc.errors import UserError
from clip_hpc.formats.index_dir import IndexDir, IndexInfo
from clip_hpc.formats.index_swap import OWNER_FILE, recover_interrupted
from clip_hpc.procs import process_start

FULL_INFO = {  # every key `clip-hpc index` writes today, with values of the types it writes
    "format": "clip-hpc-index",
    "version": 1,
    "index_key": "IVF16,PQ8x4fs",
    "dim": 32,
    "n": 990,
    "nprobe": 4,
    "model": "m",
    "pretrained": "none",
    "refine": True,
    "refine_factor": 10,
    "row_layout": "global_id",
    "n_rows": 1000,
    "unit_counts": {"0": 495, "1": 495},
    "unit_size": 500,
    "emb_dir": "/data/emb",
    "seed": 0,
    "created": "2024-01-01T00:00:00+00:00",
    "updates": [{"units": [1], "added": 10, "timings": {"add_s": 0.1}, "at": "2024-01-02T00:00:00+00:00"}],
    "train_size": 480,
    "timings": {"train_s": 0.5, "add_s": 0.1},
    "recall": {"served": 0.97, "refine_factor": 10},
    "index_bytes": 12345,
    "bytes_per_vector": 12.47,
    "faiss_version": "1.8.0",
}


def make_index_dir(root: Path, info: dict | None = None) -> IndexDir:
    index_dir = IndexDir(root)
    root.mkdir(parents=True, exist_ok=True)
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(4))
    flat.add_with_ids(np.eye(4, dtype=np.float32), np.arange(4))
    index_dir.write_index(flat)
    vectors = index_dir.create_vectors(4, 4)
    vectors[:] = np.eye(4)
    vectors.flush()
    del vectors
    with index_dir.open_metadata(readonly=False) as meta:
        meta.add(range(4), [f"/img/{i}.jpg" for i in range(4)])
    (root / "index.json").write_text(json.dumps(info or {**FULL_INFO, "dim": 4, "n": 4}))
    return index_dir


# --- IndexInfo: typed, and the JSON round-trips exactly -----------------------------------------------------------
def test_index_info_round_trips_every_key_and_value():
    info = IndexInfo.from_dict(FULL_INFO)
    assert info.to_dict() == FULL_INFO
    assert info.index_key == "IVF16,PQ8x4fs" and info.dim == 32 and info.unit_counts == {"0": 495, "1": 495}
    assert info.recall["served"] == 0.97 and info.updates[0]["units"] == [1]


def test_index_info_keeps_unknown_keys_and_an_old_file_gains_no_keys():
    newer = {**FULL_INFO, "ivfdata": "index.ivfdata"}
    assert IndexInfo.from_dict(newer).to_dict() == newer and IndexInfo.from_dict(newer).extra == {
        "ivfdata": "index.ivfdata"
    }
    old = {k: v for k, v in FULL_INFO.items() if k not in ("refine_factor", "updates", "unit_counts", "seed")}
    info = IndexInfo.from_dict(old)
    assert info.to_dict() == old  # absent stays absent: readers still see their own defaults
    assert info.refine_factor is None and info.updates == [] and info.seed == 0
    info.updates = info.updates + [{"units": [2]}]
    assert info.to_dict()["updates"] == [{"units": [2]}]  # once set, it is written


# --- load_info: the same clear errors as before ------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not an index directory (no index.json); build one with clip-hpc index"),
        ("{not json", "unreadable"),
        ('{"format": "something-else", "dim": 4}', "not a clip-hpc index (format='something-else')"),
        ("[1, 2]", "not a clip-hpc index"),
        ('{"format": "clip-hpc-index", "index_key": "Flat"}', "unreadable"),  # no dim
    ],
)
def test_a_bad_index_json_is_a_clear_error_naming_the_directory(tmp_path, content, message):
    if content is not None:
        (tmp_path / "index.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        IndexDir(tmp_path).load_info()
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["index.faiss", "vectors.npy", "meta.sqlite"])
def test_a_missing_file_is_named(tmp_path, name):
    index_dir = make_index_dir(tmp_path / "index")
    index_dir.check_complete()
    (tmp_path / "index" / name).unlink()
    with pytest.raises(UserError, match=re.escape(f"{name} is missing; rebuild the index")):
        index_dir.check_complete()


def test_opens_its_files(tmp_path):
    index_dir = make_index_dir(tmp_path / "index")
    assert index_dir.looks_like_one() and not IndexDir(tmp_path).looks_like_one()
    assert index_dir.load_info().n == 4
    vectors = index_dir.open_vectors()
    assert isinstance(vectors, np.memmap) and vectors.dtype == np.float16 and vectors.shape == (4, 4)
    with pytest.raises(ValueError):
        vectors[0, 0] = 2  # read-only
    for index in (index_dir.open_index(), index_dir.open_index(writable=True)):
        assert index.ntotal == 4 and index.search(np.eye(4, dtype=np.float32)[2:3], 1)[1][0, 0] == 2
    with index_dir.open_metadata() as meta:
        assert meta.path_of(3) == "/img/3.jpg"


# --- building beside OUT and swapping in ---------------------------------------------------------------------------
def test_swap_in_replaces_the_old_dir_whole_and_leaves_no_temp_dir(tmp_path):
    out = tmp_path / "index"
    make_index_dir(out, {**FULL_INFO, "dim": 4, "n": 4, "index_key": "old"})
    with IndexDir.build_beside(out) as tmp:
        assert tmp.root.parent == tmp_path and tmp.root.name.startswith(".index.tmp-") and tmp.root.is_dir()
        make_index_dir(tmp.root, {**FULL_INFO, "dim": 4, "n": 4, "index_key": "new"})
        assert IndexDir(out).load_info().index_key == "old"  # readers see the old one until the swap
        swapped = tmp.swap_in(out)
    assert swapped.root == out and IndexDir(out).load_info().index_key == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    assert sorted(p.name for p in out.iterdir()) == ["index.faiss", "index.json", "meta.sqlite", "vectors.npy"]


def test_a_failed_build_removes_its_temp_dir_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "index"
    make_index_dir(out)
    before = (out / "index.json").read_text()
    with pytest.raises(RuntimeError, match="boom"):
        with IndexDir.build_beside(out) as tmp:
            (tmp.root / "index.json").write_text("{}")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"] and (out / "index.json").read_text() == before


def test_write_info_is_exactly_to_dict(tmp_path):
    index_dir = IndexDir(tmp_path)
    info = IndexInfo.from_dict(FULL_INFO)
    index_dir.write_info(info)
    assert json.loads((tmp_path / "index.json").read_text()) == info.to_dict() == FULL_INFO
    assert index_dir.load_info() == info


# --- nothing outside clip_hpc/formats/ names an index or shard file or opens HDF5 ----------------------------------
def test_only_the_formats_package_names_the_files():
    package = Path(__file__).resolve().parents[1] / "clip_hpc"
    pattern = re.compile(
        r"""(?:import|from) h5py|h5py\.|["'](index\.json|vectors\.npy|meta\.sqlite|index\.faiss)["']|shard-\{"""
    )
    offenders = [
        f"{path.relative_to(package)}:{n}"
        for path in package.rglob("*.py")
        if "formats" not in path.relative_to(package).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_a_killed_builds_temp_dir_is_removed_even_when_its_pid_is_reused(tmp_path):
    """A pid is soon reused (pid_max 32768, threads take pids too): the temp dir of a dead build whose pid now
    belongs to another process goes; one of the process that is still building stays; an older host-only
    record still counts any process with that pid as its owner."""
    other = subprocess.Popen(["sleep", "60"])  # a live process standing in for whoever got the dead build's pid
    try:
        host = socket.gethostname()

        def leftover(name: str, record: str) -> Path:
            path = tmp_path / name
            path.mkdir()
            (path / OWNER_FILE).write_text(record)
            return path

        reused = leftover(f".a.tmp-{other.pid}", f"{host}\n1\n")  # its start time is not the live process's
        running = leftover(f".b.tmp-{other.pid}", f"{host}\n{process_start(other.pid)}\n")
        old_record = leftover(f".c.tmp-{other.pid}", host)
        assert recover_interrupted(tmp_path / "a") == [reused] and not reused.exists()
        assert recover_interrupted(tmp_path / "b") == [] and running.exists()
        assert recover_interrupted(tmp_path / "c") == [] and old_record.exists()
    finally:
        other.kill()
        other.wait()
    assert recover_interrupted(tmp_path / "b") == [running] and not running.exists()  # its process is gone now
