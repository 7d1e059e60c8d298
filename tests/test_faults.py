"""Faults as a standing suite: kill -9 of `clip-hpc index` (and --update) at three moments (B7), embed onto a full
tmpfs (B8), embed onto a read-only mount under real `mpiexec -n 2` (B1), bit-rot in a shard (B9).

The mounts need root (tmpfs, remount ro); those tests skip elsewhere. Cost: ~90 s in all (the index kills
dominate: 2 builds x 4 runs of ~4 s; B1 starts two ranks)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from clip_hpc.devdata import synthetic_vectors as synthetic
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.search.engine import SearchEngine
from conftest import BIN, make_images, run_cli

MODEL_ARGS = ("--model", "clip-hpc-tiny", "--pretrained", "none", "--workers", "0")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root only)")


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("embed rank")]
    errors = [line for line in lines if line.startswith(f"clip-hpc {command}: error: ")]
    assert "Traceback" not in stderr and len(errors) == 1, stderr[-3000:]
    return errors[0]


# --- B1: a failure on any rank reaches every rank ----------------------------------------------------------------
@needs_root
@pytest.mark.mpi
def test_read_only_output_is_one_error_on_every_rank_not_a_hang(tmp_path):
    images = make_images(tmp_path / "images", 8)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        proc = subprocess.run(
            [
                str(BIN / "mpiexec"),
                "-n",
                "2",
                str(BIN / "clip-hpc"),
                "embed",
                str(images),
                "--out",
                str(ro / "emb"),
                *MODEL_ARGS,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
        assert "Read-only file system" in one_error_line(proc.stderr, "embed")
        single = run_cli("embed", images, "--out", ro / "emb", *MODEL_ARGS, timeout=300)
        assert single.returncode == 2 and "Read-only" in one_error_line(single.stderr, "embed")


# --- B8: a full disk ---------------------------------------------------------------------------------------------
@needs_root
def test_embed_onto_a_full_disk_fails_cleanly_and_a_rerun_completes_exactly_once(tmp_path):
    images = make_images(tmp_path / "images", 40)
    probe = run_cli("embed", images, "--out", tmp_path / "probe", *MODEL_ARGS, "--shard-size", "10", check=True)
    shard_bytes = max(p.stat().st_size for p in EmbDir(tmp_path / "probe").shard_files())
    with tmpfs(tmp_path / "full", "2m") as disk:
        out = disk / "emb"
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * (free - int(2.5 * shard_bytes) - 16384))  # room for inputs.txt and ~2 shards
        proc = run_cli("embed", images, "--out", out, *MODEL_ARGS, "--shard-size", "10", timeout=300)
        assert proc.returncode == 2, (probe.returncode, proc.stderr[-3000:])
        assert "No space left on device" in one_error_line(proc.stderr, "embed")
        emb = EmbDir(out)
        finished = emb.shard_files()
        assert 1 <= len(finished) < 4
        for path in finished:  # every shard under a final name is whole
            assert emb.check_unit(EmbDir.unit_of(path), 10, 10).ok, path
        assert not [p for p in emb.shard_dir.iterdir() if p.name.startswith(".")], "no temporary file is left"
        filler.unlink()
        rerun = run_cli("embed", images, "--out", out, *MODEL_ARGS, "--shard-size", "10", timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        ids = np.concatenate([np.concatenate([s.ids, s.failed_ids]) for s in emb.iter_shards()])
        assert sorted(ids.tolist()) == list(range(40))  # every id exactly once


# --- B9: bit-rot ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["nan", "scaled"])
def test_corrupted_embeddings_are_refused_by_index_naming_the_shard(tmp_path, damage):
    vectors, labels = synthetic.gaussian_mixture(300, 16, 5, latent=8, seed=1)
    emb = synthetic.write_emb_dir(tmp_path / "emb", vectors, labels, 100)
    shard = EmbDir(emb).shard_path(1)
    with h5py.File(shard, "r") as f:
        offset = f["embeddings"].id.get_offset()
    with open(shard, "r+b") as f:  # overwrite row 3's bytes in place, as a failing disk would
        f.seek(offset + 3 * 16 * 2)
        row = np.full(16, np.nan if damage == "nan" else 0.9, dtype=np.float16)
        f.write(row.tobytes())
    proc = run_cli("index", emb, "--out", tmp_path / "index", "--quiet")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "shard-000001.h5" in line and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "index").exists() and not list(tmp_path.glob(".index.*"))


# --- B7: kill -9 of a build --------------------------------------------------------------------------------------
def _timed_build(cmd: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return time.monotonic() - start


def _kill_at(cmd: list[str], after: float) -> bool:
    """Start `cmd`, SIGKILL it `after` seconds in; True if it was killed (not already finished)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def _answers(index: Path, queries: np.ndarray) -> list[list[int]]:
    engine = SearchEngine(index, model_name="clip-hpc-tiny", pretrained="none")
    try:
        return [[h.id for h in hits] for hits in engine.search_vectors(queries, 10)]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def big_emb(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    vectors, labels = synthetic.gaussian_mixture(60_000, 64, 200, latent=16, seed=7)
    root = tmp_path_factory.mktemp("kill")
    return root, vectors, labels


def test_kill_9_of_index_at_three_moments_leaves_nothing_accepted_and_a_rerun_succeeds(big_emb):
    root, vectors, labels = big_emb
    emb = synthetic.write_emb_dir(root / "emb-full", vectors, labels, 10_000)
    cmd = [str(BIN / "clip-hpc"), "index", str(emb), "--quiet", "--out"]
    full = _timed_build(cmd + [str(root / "reference")])
    out = root / "index"
    killed = 0
    for fraction in (0.2, 0.5, 0.85):
        killed += _kill_at(cmd + [str(out)], fraction * full)
        if out.exists():  # the build finished before the kill: a whole index, fine; start over
            IndexDir(out).load_info()
            continue
        with pytest.raises(UserError):
            SearchEngine(out, model_name="clip-hpc-tiny", pretrained="none")
        assert run_cli("search", out, "a photo").returncode == 2
        serve = run_cli("serve", out, "--port", "0", "--connection-file", root / "c.json", timeout=120)
        assert serve.returncode == 2 and not (root / "c.json").exists()
    assert killed >= 2, "the kills must land while the build runs"
    leftovers = list(root.glob(".index.*"))
    if out.exists():
        shutil.rmtree(out)
    run_cli("index", emb, "--out", out, "--quiet", check=True)
    assert not list(root.glob(".index.*")), f"stale build dirs of dead pids are removed ({leftovers})"
    assert IndexDir(out).load_info().n == 60_000


def test_kill_9_of_index_update_keeps_the_old_index_answering(big_emb):
    root, vectors, labels = big_emb
    emb = root / "emb-grow"
    synthetic.write_emb_dir(emb, vectors[:30_000], labels[:30_000], 10_000)
    out = root / "grown"
    run_cli("index", emb, "--out", out, "--quiet", check=True)
    queries = vectors[[3, 1234, 25_000]]
    before = _answers(out, queries)
    synthetic.write_emb_dir(emb, vectors[30_000:], labels[30_000:], 10_000, first_id=30_000)
    cmd = [str(BIN / "clip-hpc"), "index", str(emb), "--out", str(out), "--update", "--quiet"]
    work = root / "grown-probe"
    subprocess.run(["cp", "-a", str(out), str(work)], check=True)
    full = _timed_build([str(BIN / "clip-hpc"), "index", str(emb), "--out", str(work), "--update", "--quiet"])
    killed = 0
    for fraction in (0.1, 0.25, 0.5, 0.85):  # early ones too: a warm re-run can be faster than the timed one
        was_killed = _kill_at(cmd, fraction * full)
        n = IndexDir(out).load_info().n
        if not was_killed or n == 60_000:  # finished, or killed after its swap on the way out: whole either way
            assert n == 60_000
            break
        assert n == 30_000
        assert _answers(out, queries) == before, "the previous index still answers the same queries"
        killed += 1
    assert killed >= 2
    run_cli("index", emb, "--out", out, "--update", "--quiet", check=True)
    assert IndexDir(out).load_info().n == 60_000
    assert not list(root.glob(".grown.*"))
