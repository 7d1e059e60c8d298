"""The embed stage end to end through the real CLI: MPI ranks, resume after SIGKILL, bad images, clear errors."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from clip_hpc.devdata.sample_images import write_bad_images
from clip_hpc.formats.emb_dir import EmbDir, file_sha256
from clip_hpc.formats.shard import ShardBatch, read_shard
from conftest import BIN, ROOT, kill_after_shards, run_cli

TINY = ["--model", "clip-hpc-tiny", "--pretrained", "none"]


def mpi_embed(n: int, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mpiexec"), "-n", str(n), str(BIN / "clip-hpc"), "embed", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def coverage(emb_dir: Path) -> tuple[np.ndarray, list[str]]:
    """All ids (embedded and failed) across shards, and the embedded paths in id order."""
    ids, failed, paths = [], [], []
    for shard in EmbDir(emb_dir).iter_shards(with_embeddings=False):
        ids.append(shard.ids)
        failed.append(shard.failed_ids)
        paths.extend(shard.paths)
    return np.sort(np.concatenate(ids + failed)), paths


def load_all(emb_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    parts = list(EmbDir(emb_dir).iter_shards())
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
    inputs = EmbDir(out).read_inputs()
    assert len(inputs) >= 300
    ids, paths = coverage(out)
    assert np.array_equal(ids, np.arange(len(inputs)))
    assert paths == inputs  # sample images are all good: every one embedded, in id order
    manifest = EmbDir(out).load_manifest()
    assert manifest.n_embedded == len(inputs) and manifest.n_failed == 0
    assert manifest.inputs_sha256 == file_sha256(out / "inputs.txt")
    assert "rank 1" in proc.stdout and "img/s" in proc.stdout
    ranks = {read_shard(p, with_embeddings=False).attrs["rank"] for p in EmbDir(out).shard_files()}
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
    before = {p.name: p.stat().st_mtime_ns for p in EmbDir(out).shard_files()}
    proc = run_cli("embed", sample_images, "--out", out, *TINY, "--shard-size", 50)
    assert proc.returncode == 0, proc.stderr
    assert "has 0 of its" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in EmbDir(out).shard_files()} == before


@pytest.mark.mpi
@pytest.mark.slow
def test_sigkill_then_resume_with_another_world_size(sample_images, tmp_path):
    out = tmp_path / "emb"
    cmd = [
        str(BIN / "mpiexec"),
        "-n",
        "2",
        str(BIN / "clip-hpc"),
        "embed",
        str(sample_images),
        "--out",
        str(out),
        *TINY,
        "--shard-size",
        "10",
        "--batch-size",
        "2",
        "--workers",
        "0",
    ]
    kill_after_shards(cmd, out)
    survivors = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in EmbDir(out).shard_files()}
    n_units = -(-len(EmbDir(out).read_inputs()) // 10)
    assert 3 <= len(survivors) < n_units, "the run must be killed part-way"
    assert not (out / "manifest.json").exists()

    resumed = mpi_embed(3, sample_images, "--out", out, *TINY, "--shard-size", 10, "--workers", 0)
    assert resumed.returncode == 0, resumed.stderr
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in EmbDir(out).shard_files()}
    assert all(after[name] == stamp for name, stamp in survivors.items()), "a finished shard was recomputed"
    ids, _ = coverage(out)
    assert np.array_equal(ids, np.arange(len(EmbDir(out).read_inputs())))
    assert EmbDir(out).load_manifest().n_units == n_units
    assert not list((out / "shards").glob(".*tmp*"))


def test_bad_images_are_recorded_not_fatal(tmp_path):
    expect = write_bad_images(tmp_path / "bad")
    out = tmp_path / "emb"
    proc = run_cli("embed", tmp_path / "bad", "--out", out, *TINY, "--shard-size", 4, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    failed, embedded = {}, set()
    for shard in EmbDir(out).iter_shards():
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
        run_cli("embed", img_dir, "--out", out, "--model", "clip-hpc-tiny", "--pretrained", corrupt)
    )
    offline = run_cli("embed", img_dir, "--out", out, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert "clip-hpc fetch-model ViT-B-32 laion2b_s34b_b79k" in one_line_error(offline)
    assert "is not a directory" in one_line_error(run_cli("info", tmp_path / "missing"))


@pytest.mark.mpi
def test_an_error_on_every_rank_is_said_once_and_nobody_hangs(sample_images, tmp_path):
    proc = mpi_embed(2, sample_images, "--out", tmp_path / "out", "--model", "nope", "--shard-size", 50)
    assert "unknown model" in one_line_error(proc)


def test_pending_units_redoes_exactly_what_the_shard_check_rejects(tmp_path):
    from clip_hpc.ingest.embed import pending_units
    from clip_hpc.ingest.sources import plan_work_units

    emb = EmbDir(tmp_path)
    units = plan_work_units(12, 5)  # units of 5, 5 and 2 ids
    for unit, model in ((0, "m"), (1, "other"), (2, "m")):
        ids = list(units[unit].ids)
        emb.write_shard(
            unit,
            ShardBatch(
                embeddings=np.zeros((len(ids), 4), np.float16),
                ids=ids,
                paths=[str(i) for i in ids],
                attrs={"model": model, "pretrained": "none", "unit_size": 5},
            ),
        )
    assert [u.index for u in pending_units(emb, units, 5, "m", "none")] == [1]  # another model: redone
    path = emb.shard_path(0)
    path.write_bytes(path.read_bytes()[:100])
    assert not emb.check_unit(0, 5, 5).ok
    assert [u.index for u in pending_units(emb, units, 5, "m", "none")] == [0, 1]
    grown = plan_work_units(14, 5)  # --append: the last unit now spans 4 ids, its 2-id shard no longer covers it
    assert [u.index for u in pending_units(emb, grown, 5, "m", "none")] == [0, 1, 2]
    emb.shard_path(2).unlink()
    assert [u.index for u in pending_units(emb, units, 5, "m", "none")] == [0, 1, 2]


def test_rerun_with_another_shard_size_or_model_is_refused_and_touches_nothing(tmp_path):
    """Before: `--shard-size 6` over a dir cut in units of 4 silently re-embedded every image and left the old
    shards beside the new ones (export then wrote ids twice); another --model (the sbatch default) re-embedded all.
    Now each is one line, exit 2, before inputs.txt or a shard changes, even with --append and new files."""
    from conftest import make_images

    images = make_images(tmp_path / "img", 8, seed=3)
    out = tmp_path / "emb"
    run_cli("embed", images, "--out", out, *TINY, "--shard-size", 4, "--workers", 0, check=True)
    before = {p.name: p.stat().st_mtime_ns for p in EmbDir(out).shard_files()}
    inputs = (out / "inputs.txt").read_bytes()
    make_images(images / "more", 2, seed=4)
    line = one_line_error(run_cli("embed", images, "--out", out, *TINY, "--shard-size", 6, "--workers", 0, "--append"))
    assert "made with --shard-size 4" in line and "new --out" in line
    line = one_line_error(
        run_cli("embed", images, "--out", out, "--model", "clip-hpc-demo", "--shard-size", 4, "--append")
    )
    assert "made with --model clip-hpc-tiny --pretrained none" in line
    assert (out / "inputs.txt").read_bytes() == inputs
    assert {p.name: p.stat().st_mtime_ns for p in EmbDir(out).shard_files()} == before
