"""Issue 20, the INDEX_DIR part: a damaged or truncated file is one line naming it (exit 2) when search or serve
loads the index, never a signal or a traceback; a full disk in index, --update or export is one line and leaves
nothing behind; index.json tells the truth after --update. Synthetic vectors (no model in the builds), ~40 s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clip_hpc.devdata import synthetic_vectors as synthetic
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.formats.index_integrity import DamagedIndex
from clip_hpc.index.build import build_index
from clip_hpc.index.update import update_index
from clip_hpc.search.engine import SearchEngine
from conftest import BIN, run_cli
from test_faults import needs_root, one_error_line, tmpfs

DIM, UNIT, N_BASE, N_MORE = 128, 400, 800, 400  # the tiny model's dim, so search and serve run a real query
KEY = ("--index-key", "IVF8,Flat", "--lists", "disk")


def _write_emb(out: Path, vectors: np.ndarray, labels: np.ndarray, first_id: int = 0) -> Path:
    return synthetic.write_emb_dir(
        out, vectors, labels, UNIT, first_id=first_id, model="clip-hpc-tiny", pretrained="none"
    )


@pytest.fixture(scope="module")
def embs(tmp_path_factory) -> SimpleNamespace:
    """Two EMB_DIRs: `base` (two units) and `more` (the same plus a third unit, for --update)."""
    root = tmp_path_factory.mktemp("integrity")
    vectors, labels = synthetic.gaussian_mixture(N_BASE + N_MORE, DIM, 20, latent=8, seed=0)
    base = _write_emb(root / "base", vectors[:N_BASE], labels[:N_BASE])
    more = root / "more"
    shutil.copytree(base, more)
    _write_emb(more, vectors[N_BASE:], labels[N_BASE:], first_id=N_BASE)
    return SimpleNamespace(root=root, base=base, more=more, vectors=vectors.astype(np.float16).astype(np.float32))


@pytest.fixture(scope="module")
def disk_index(embs) -> Path:
    """An IVF index with its lists in lists.ivfdata, as a many-rank build writes them."""
    out = embs.root / "index"
    build_index(embs.base, out, index_key=KEY[1], lists="disk", progress=False)
    return out


def _damaged_copy(index: Path, where: Path, name: str, size: int | None, *, record: bool) -> Path:
    """A copy of `index` with `name` cut to `size` bytes (None: half); `record=False` drops the integrity record,
    as in an index.json written before it."""
    copy = where / "damaged"
    shutil.copytree(index, copy)
    path = copy / name
    os.truncate(path, path.stat().st_size // 2 if size is None else size)
    if not record:
        info = json.loads((copy / "index.json").read_text())
        info.pop("files", None)
        (copy / "index.json").write_text(json.dumps(info))
    return copy


def _assert_names_damage(proc: subprocess.CompletedProcess, command: str, path: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = one_error_line(proc.stderr, command)
    assert str(path) in line and "the index is damaged; rebuild it with clip-hpc index" in line, line


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "older-index-json"])
def test_n2_truncated_ivfdata_is_one_line_exit_2(disk_index, tmp_path, record):
    damaged = _damaged_copy(disk_index, tmp_path, "lists.ivfdata", 24000, record=record)
    _assert_names_damage(run_cli("search", damaged, "red star", timeout=120), "search", damaged / "lists.ivfdata")
    if not record:
        return
    conn = tmp_path / "conn.json"
    serve = subprocess.Popen(
        [str(BIN / "clip-hpc"), "serve", str(damaged), "--port", "0", "--connection-file", str(conn)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = serve.communicate(timeout=60)  # the old code served on, and died at the first query
    finally:
        serve.kill()
    _assert_names_damage(
        subprocess.CompletedProcess(serve.args, serve.returncode, out, err), "serve", damaged / "lists.ivfdata"
    )
    assert not conn.exists() and "listening" not in out


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "older-index-json"])
@pytest.mark.parametrize("size", [None, 0], ids=["half", "zero"])
@pytest.mark.parametrize("name", ["index.faiss", "vectors.npy", "meta.sqlite"])
def test_n10_damaged_index_files(disk_index, tmp_path, name, size, record):
    damaged = _damaged_copy(disk_index, tmp_path, name, size, record=record)
    _assert_names_damage(run_cli("search", damaged, "red star", timeout=120), "search", damaged / name)


def test_n15_update_on_disk_lists_index_json_is_true(embs, disk_index, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(disk_index, out)
    info = update_index(embs.more, out, progress=False)
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["lists"] == info.lists == "disk" and (out / "lists.ivfdata").is_file()
    assert on_disk["n"] == N_BASE + N_MORE and set(on_disk["files"]) >= {"lists.ivfdata", "index.faiss"}
    engine = SearchEngine(out, encoder=SimpleNamespace(dim=DIM))  # checks every file against the record
    try:
        found = [engine.search_vectors(embs.vectors[i], 1)[0][0].id for i in (5, N_BASE + 7, N_BASE + N_MORE - 1)]
    finally:
        engine.close()
    assert found == [5, N_BASE + 7, N_BASE + N_MORE - 1]


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk (skipped where mounting is not permitted)."""
    mount = tmpfs(tmp_path / "disk", "2m")
    try:
        disk = mount.__enter__()
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        yield disk
    finally:
        mount.__exit__(None, None, None)


def _fill(disk: Path, free_kib: int) -> None:
    """Leave about `free_kib` KiB free on `disk`."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(disk)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - free_kib * 1024)


def _assert_full_disk(proc: subprocess.CompletedProcess, command: str, disk: Path, left: set[str]) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = one_error_line(proc.stderr, command)
    assert "No space left on device" in line and f"re-run clip-hpc {command}" in line, line
    assert set(os.listdir(disk)) == left | {"filler"}, "nothing of the failed run is left behind"


@needs_root
def test_n4_full_disk_during_index(embs, small_disk):
    out = small_disk / "index"
    for free_kib in (56, 848):  # fails writing vectors.npy (the old code: SIGBUS), then lists.ivfdata
        _fill(small_disk, free_kib)
        _assert_full_disk(run_cli("index", embs.base, "--out", out, *KEY, "--quiet"), "index", small_disk, set())
    (small_disk / "filler").unlink()
    run_cli("index", embs.base, "--out", out, *KEY, "--quiet", check=True)
    before = IndexDir(out).check_integrity()

    for free_kib in (56, 600):  # --update: fails copying meta.sqlite, then writing the lists; the old index stays
        _fill(small_disk, free_kib)
        _assert_full_disk(
            run_cli("index", embs.more, "--out", out, "--update", "--quiet"), "index", small_disk, {"index"}
        )
        assert IndexDir(out).check_integrity().n == before.n == N_BASE
    (small_disk / "filler").unlink()
    run_cli("index", embs.more, "--out", out, "--update", "--quiet", check=True)
    assert IndexDir(out).check_integrity().n == N_BASE + N_MORE

    shutil.rmtree(out)
    _fill(small_disk, 56)
    _assert_full_disk(run_cli("export", embs.base, "--out", small_disk / "export"), "export", small_disk, set())
    (small_disk / "filler").unlink()
    run_cli("export", embs.base, "--out", small_disk / "export", check=True)


def test_a_changed_file_of_the_same_size_is_named(disk_index, tmp_path):
    damaged = _damaged_copy(
        disk_index, tmp_path, "vectors.npy", (disk_index / "vectors.npy").stat().st_size, record=True
    )
    with open(damaged / "vectors.npy", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(DamagedIndex, match="vectors.npy is not the file index.json recorded"):
        IndexDir(damaged).check_integrity()
