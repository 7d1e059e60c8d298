"""`clip-hpc submit`, the profiles it reads and the weights cache they name, without a cluster: the rendered sbatch
command, the one-line stop of a GPU job without GPUs, fetch-model and an offline run agreeing on the cache.
(The submitted jobs themselves run in tests/test_slurm.py.)"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from conftest import ROOT, make_images, run_cli
from slurm_fixtures import perlmutter_like_profile


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SBATCH_/CLIP_HPC_/SLURM_/HF_ settings, so that only the profile speaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "CLIP_HPC_", "SLURM_", "HF_"))}
    return {**env, "CLIP_HPC_HOME": str(ROOT), **extra}


def submit(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "clip-hpc"), "submit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or clean_env(),
    )


def test_submit_renders_the_profiles_constraint_qos_account_and_log_dir(tmp_path: Path) -> None:
    profile = perlmutter_like_profile(tmp_path / "pm.sh", data=tmp_path / "data", weights=tmp_path / "w")
    proc = submit("--profile", profile, "--dry-run", "embed", "IMAGES", "--out", "EMB")
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words[0] == "sbatch" and words[-4:] == [str(ROOT / "slurm" / "embed.sbatch"), "IMAGES", "--out", "EMB"]
    assert {"--constraint=gpu", "--qos=regular", "--account=m1234", "--ntasks=2", "--job-name=clip-embed"} <= set(words)
    assert f"--output={tmp_path / 'data' / 'logs'}/clip-embed-%j.out" in words, "logs go to the data dir"
    assert not (tmp_path / "data").exists(), "--dry-run makes nothing"


def test_the_users_sbatch_options_win_over_the_profiles(tmp_path: Path) -> None:
    profile = perlmutter_like_profile(tmp_path / "pm.sh", data=tmp_path / "data", weights=tmp_path / "w")
    proc = submit(
        "--profile", profile, "--dry-run", "index", "-q", "debug", "-o", tmp_path / "x.out", "--", "EMB", "--out", "I"
    )
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert "--qos=regular" not in words and words[words.index("-q") + 1] == "debug"
    assert not any(w.startswith("--output=") for w in words) and "--constraint=gpu" in words
    assert words.index("-q") < words.index(str(ROOT / "slurm" / "index.sbatch")) < words.index("EMB")


def test_the_perlmutter_profile_renders_a_gpu_job(tmp_path: Path) -> None:
    env = clean_env(CLIP_HPC_ACCOUNT="m1234", SCRATCH=str(tmp_path / "scratch"), HOME=str(tmp_path / "home"))
    words = shlex.split(submit("--profile", "perlmutter", "--dry-run", "embed", "IMG", env=env).stdout)
    assert {"--constraint=gpu", "--qos=regular", "--account=m1234", "--gpus-per-node=4", "--gpu-bind=none"} <= set(
        words
    )
    assert "--gpus-per-task=1" not in words
    serve = shlex.split(submit("--profile", "perlmutter", "--dry-run", "serve", "IDX", env=env).stdout)
    assert {"--constraint=cpu", "--qos=shared", "--mem=32G"} <= set(serve) and "--constraint=gpu" not in serve


def test_unknown_profile_and_missing_sbatch_are_one_line(tmp_path: Path) -> None:
    proc = submit("--profile", "nosuchcluster", "embed", "x")
    assert proc.returncode == 2 and "no profile 'nosuchcluster'" in proc.stderr and "perlmutter" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    profile = perlmutter_like_profile(tmp_path / "pm.sh", data=tmp_path / "data", weights=tmp_path / "w")
    no_sbatch = tmp_path / "bin"  # a login shell's tools, without SLURM's
    no_sbatch.mkdir()
    for tool in ("bash", "id", "hostname"):
        (no_sbatch / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    proc = submit("--profile", profile, "embed", "x", env=clean_env(PATH=str(no_sbatch)))
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr, proc.stderr


def test_perlmutter_profile_exports_what_jobs_need() -> None:
    script = (
        'source "$CLIP_HPC_HOME/hpc/perlmutter.sh" && echo "$MPICH_GPU_SUPPORT_ENABLED|$CLIP_HPC_SRUN_MPI|'
        '$CLIP_HPC_WEIGHTS|$CLIP_HPC_SSH_KEY|$HF_HOME"'
    )
    out = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(HOME="/home/u", SCRATCH="/scratch/u", MPICH_GPU_SUPPORT_ENABLED="1"),
    )
    gpu_support, plugin, weights, key, hf_home = out.stdout.strip().split("|")
    assert (gpu_support, plugin) == ("0", "cray_shasta")
    assert weights == "/home/u/.cache/clip-hpc/weights", "weights in $HOME, never purged like $SCRATCH"
    assert key == "~/.ssh/nersc" and hf_home == weights + "/huggingface"


def test_a_gpu_job_without_gpus_stops_with_one_line(tmp_path: Path) -> None:
    profile = perlmutter_like_profile(tmp_path / "pm.sh", data=tmp_path / "data", weights=tmp_path / "w")
    env = clean_env(CLIP_HPC_PROFILE=str(profile), SLURM_JOB_ID="7", SLURM_NTASKS="2")
    proc = subprocess.run(
        ["bash", ROOT / "slurm" / "embed.sbatch", "IMAGES", "--out", tmp_path / "emb"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "expects 4 GPU(s) per node and this job has none" in proc.stderr and "clip-hpc submit embed" in proc.stderr
    with_gpus = subprocess.run(
        ["bash", "-c", f"source {ROOT}/slurm/common.sh && clip_hpc_require_gpus && echo passed"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "SLURM_GPUS_ON_NODE": "4"},
    )
    assert with_gpus.stdout.strip() == "passed", with_gpus.stderr


def test_fetch_model_and_an_offline_job_use_the_profiles_weights_cache(tmp_path: Path) -> None:
    """fetch-model on the "login node" (the profile named, nothing else set) fills the profile's CLIP_HPC_WEIGHTS;
    an offline run with the profile's environment finds the weights there, and one with another cache does not."""
    weights = tmp_path / "weights"
    profile = perlmutter_like_profile(tmp_path / "pm.sh", data=tmp_path / "data", weights=weights, gpus=0)
    fetched = run_cli("fetch-model", "--profile", profile, "clip-hpc-demo", "bundled", env=clean_env(), check=True)
    assert Path(fetched.stdout.strip()) == weights / "clip-hpc-demo.safetensors"
    images = make_images(tmp_path / "images", 8)
    job_env = clean_env(CLIP_HPC_WEIGHTS=str(weights), HF_HUB_OFFLINE="1")
    demo = ("--model", "clip-hpc-demo", "--pretrained", "bundled")
    run_cli("embed", images, "--out", tmp_path / "emb", *demo, env=job_env, check=True)
    elsewhere = run_cli(
        "embed", images, "--out", tmp_path / "emb2", *demo, env={**job_env, "CLIP_HPC_WEIGHTS": str(tmp_path / "no")}
    )
    assert elsewhere.returncode == 2 and "not in the local cache" in elsewhere.stderr
    assert f"--cache-dir {tmp_path / 'no'}" in elsewhere.stderr, "the hint names the directory the job looked in"
