"""The embed stage end to end through the real CLI: MPI ranks, resume after SIGKILL, bad images, clear errors."""
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from clip_hpc import shards
from clip_hpc.sample_images import write_bad_images
from conftest import BIN, ROOT, run_cli

TINY = ["--model", "clip-hpc-tiny", "--pretrained", "none"]


def mpi_embed(n: int, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mpiexec"), "-n", str(n), str(BIN / "clip-hpc"), "embed", *map(str, args)],
                          capture_output=True, text=True, timeout=600, **kw)


def coverage(emb_dir: Path) -> tuple[np.ndarray, list[str]]:
    """All ids (embedded and failed) across shards, and the embedded paths in id order."""
    ids, failed, paths = [], [], []
    for shard in shards.iter_shards(emb_dir, with_embeddings=False):
        ids.append(shard.ids)
        failed.append(shard.failed_ids)
        paths.extend(shard.paths)
    return np.sort(np.concatenate(ids + failed)), paths


def load_all(emb_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    parts = list(shards.iter_shards(emb_dir))
    return np.concatenate([s.ids for s in parts]), np.concatenate([s.embeddings for s in parts]).astype(np.float32)


@pytest.fixture(scope="module")
def two_rank_run(sample_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb2")
    proc = mpi_embed(2, sample_images, "--out", out, *TINY, "--shard-size", 50, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.mpi
def test_two_ranks_cover_every_id_once_and_match_single_process(two_rank_run, sample_images, tmp_path):
    out, proc = two_rank_run
    inputs = shards.read_inputs(out)
    assert len(inputs) >= 300
    ids, paths = coverage(out)
    assert np.array_equal(ids, np.arange(len(inputs)))
    assert paths == inputs  # sample images are all good: every one embedded, in id order
    manifest = shards.load_manifest(out)
    assert manifest["n_embedded"] == len(inputs) and manifest["n_failed"] == 0
    assert manifest["inputs_sha256"] == shards.file_sha256(out / "inputs.txt")
    assert "rank 1" in proc.stdout and "img/s" in proc.stdout
    ranks = {shards.read_shard(p, with_embeddings=False).attrs["rank"] for p in shards.list_shard_files(out)}
    assert ranks == {0, 1}

    single = tmp_path / "single"
    run_cli("embed", sample_images, "--out", single, *TINY, "--shard-size", 50, "--workers", 0, check=True)
    ids1, emb1 = load_all(single)
    ids2, emb2 = load_all(out)
    assert np.array_equal(ids1, ids2)
    assert np.abs(emb1 - emb2).max() <= 2e-3


@pytest.mark.mpi
def test_rerun_skips_every_valid_shard(two_rank_run, sample_images):
    out, _ = two_rank_run
    before = {p.name: p.stat().st_mtime_ns for p in shards.list_shard_files(out)}
    proc = run_cli("embed", sample_images, "--out", out, *TINY, "--shard-size", 50)
    assert proc.returncode == 0, proc.stderr
    assert "has 0 of its" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shards.list_shard_files(out)} == before


@pytest.mark.mpi
@pytest.mark.slow
def test_sigkill_then_resume_with_another_world_size(sample_images, tmp_path):
    out = tmp_path / "emb"
    cmd = [str(BIN / "mpiexec"), "-n", "2", str(BIN / "clip-hpc"), "embed", str(sample_images), "--out", str(out),
           *TINY, "--shard-size", "10", "--batch-size", "2", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(shards.list_shard_files(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in shards.list_shard_files(out)}
    n_units = -(-len(shards.read_inputs(out)) // 10)
    assert 3 <= len(survivors) < n_units, "the run must be killed part-way"
    assert not (out / "manifest.json").exists()

    resumed = mpi_embed(3, sample_images, "--out", out, *TINY, "--shard-size", 10, "--workers", 0)
    assert resumed.returncode == 0, resumed.stderr
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in shards.list_shard_files(out)}
    assert all(after[name] == stamp for name, stamp in survivors.items()), "a finished shard was recomputed"
    ids, _ = coverage(out)
    assert np.array_equal(ids, np.arange(len(shards.read_inputs(out))))
    assert shards.load_manifest(out)["n_units"] == n_units
    assert not list((out / "shards").glob(".*tmp*"))


def test_bad_images_are_recorded_not_fatal(tmp_path):
    expect = write_bad_images(tmp_path / "bad")
    out = tmp_path / "emb"
    proc = run_cli("embed", tmp_path / "bad", "--out", out, *TINY, "--shard-size", 4, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    failed, embedded = {}, set()
    for shard in shards.iter_shards(out):
        embedded.update(Path(p).name for p in shard.paths)
        failed.update({Path(p).name: r for p, r in zip(shard.failed_paths, shard.failed_reasons)})
        assert np.isfinite(shard.embeddings.astype(np.float32)).all()
    assert embedded == {name for name, outcome in expect.items() if outcome == "ok"}
    assert set(failed) == {name for name, outcome in expect.items() if outcome == "failed"}
    assert failed["bomb.png"].startswith("too many pixels") and failed["empty.jpg"] == "empty file"
    assert failed["text.jpg"] == "not an image" and failed["truncated.jpg"].startswith("truncated")
    info = run_cli("info", out, "--json", check=True)
    assert '"too many pixels": 1' in info.stdout and '"complete": true' in info.stdout


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_input_gives_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 64)
    out = tmp_path / "out"
    assert "does not exist" in one_line_error(run_cli("embed", tmp_path / "missing", "--out", out, *TINY))
    assert "no images" in one_line_error(run_cli("embed", tmp_path / "empty", "--out", out, *TINY))
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a.jpg").write_bytes((ROOT / "pyproject.toml").read_bytes())
    assert "unknown model" in one_line_error(run_cli("embed", img_dir, "--out", out, "--model", "nope"))
    assert "cannot read checkpoint" in one_line_error(
        run_cli("embed", img_dir, "--out", out, "--model", "clip-hpc-tiny", "--pretrained", corrupt))
    offline = run_cli("embed", img_dir, "--out", out, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert "clip-hpc fetch-model ViT-B-32 laion2b_s34b_b79k" in one_line_error(offline)
    assert "is not a directory" in one_line_error(run_cli("info", tmp_path / "missing"))


@pytest.mark.mpi
def test_an_error_on_every_rank_is_said_once_and_nobody_hangs(sample_images, tmp_path):
    proc = mpi_embed(2, sample_images, "--out", tmp_path / "out", "--model", "nope", "--shard-size", 50)
    assert "unknown model" in one_line_error(proc)
