"""The sbatch scripts and profiles without a cluster: what they do with what SLURM and a login node hand them.
(The real sbatch path runs in tests/test_slurm.py, which starts a local cluster and takes minutes.)"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from conftest import ROOT


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "CLIP_HPC_", "SLURM_", "OMP_", "HF_"))}
    return {**env, "CLIP_HPC_HOME": str(ROOT), **extra}


def test_index_sbatch_lets_the_command_line_choose_the_task_count() -> None:
    # On SLURM 22.05, `sbatch --ntasks-per-node=4 index.sbatch` with `#SBATCH --ntasks=1` in the script gave
    # SLURM_NTASKS=1: a script's --ntasks wins over a command line's --ntasks-per-node, so the README's
    # `sbatch -N 4 --ntasks-per-node=1` and the perlmutter profile's index options ran one index rank.
    headers = [
        line.split()[1]
        for line in (ROOT / "slurm" / "index.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    assert not any(h.startswith(("--ntasks=", "-n")) for h in headers), headers


def test_serve_log_is_private_when_its_path_has_a_space(tmp_path: Path) -> None:
    # A stand-in scontrol prints what the real one does for `--output="/a b/clip-serve-%j.out"` (a WORK_DIR with a
    # space); a stand-in clip-hpc exits at once: the log must be 0600 before the server would print its token.
    bin_dir, logs = tmp_path / "bin", tmp_path / "my logs"
    bin_dir.mkdir(), logs.mkdir()
    log = logs / "clip-serve-42.out"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho 'JobId=42 JobName=clip-serve StdOut={log} StdErr={log}'\n")
    (bin_dir / "clip-hpc").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = _clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        CLIP_HPC_VENV=str(tmp_path / "novenv"),
        SLURM_JOB_ID="42",
        CLIP_HPC_CONNECTION_FILE=str(tmp_path / "conn.json"),
        HOME=str(tmp_path),
    )
    with open(log, "w") as out:
        os.chmod(log, 0o644)
        proc = subprocess.run(
            ["bash", ROOT / "slurm" / "serve.sbatch", "IDX"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=60,
        )
    assert proc.returncode == 2 and "exited before it was ready" in proc.stderr
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def _profile(profile: str, *names: str, **env: str) -> dict[str, str]:
    script = f'source "$CLIP_HPC_HOME/hpc/{profile}.sh" && ' + " && ".join(f'echo "{n}=${{{n}-unset}}"' for n in names)
    proc = subprocess.run(
        ["bash", "-euc", script],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(SCRATCH="/scratch/u", **env),
    )
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_perlmutter_profile_sets_omp_threads_in_the_job_not_on_the_login_node() -> None:
    # pipeline.sh sources the profile on the login node and sbatch exports its environment into the job: an
    # OMP_NUM_THREADS=8 set there reached the embed and index tasks of -c 32 (8 torch/FAISS threads of 32)
    assert _profile("perlmutter", "OMP_NUM_THREADS")["OMP_NUM_THREADS"] == "unset"
    in_job = _profile("perlmutter", "OMP_NUM_THREADS", SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="32")
    assert in_job["OMP_NUM_THREADS"] == "32"
    assert _profile("perlmutter", "OMP_NUM_THREADS", SLURM_JOB_ID="7", OMP_NUM_THREADS="4")["OMP_NUM_THREADS"] == "4"


def test_a_profile_that_does_not_end_with_generic_fails_with_one_line(tmp_path: Path) -> None:
    # set -u made a custom profile without `source .../generic.sh` a bare "CLIP_HPC_SRUN_MPI: unbound variable"
    profile = tmp_path / "mine.sh"
    profile.write_text(': "${CLIP_HPC_EMBED_SBATCH:=-n 2}"\n')
    proc = subprocess.run(
        ["bash", ROOT / "slurm" / "embed.sbatch", "IMAGES", "--out", tmp_path / "emb"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(CLIP_HPC_PROFILE=str(profile), PATH="/usr/bin:/bin"),
    )
    assert proc.returncode == 2 and "unbound variable" not in proc.stderr, proc.stderr
    assert "CLIP_HPC_VENV" in proc.stderr and "generic.sh" in proc.stderr
