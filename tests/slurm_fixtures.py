"""Fixtures for the SLURM tests: a real single-node cluster (munged, slurmctld, slurmd) started by
scripts/slurm-local.sh in its own state dir and on free ports, and stopped by pid at the end of the session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

SLURM_LOCAL = ROOT / "scripts" / "slurm-local.sh"
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _two_free_ports() -> int:
    """A port p with p and p+1 both free (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@dataclass
class SlurmCluster:
    """A running local cluster; `env` is what sbatch, squeue and the sbatch scripts need."""

    state: Path
    env: dict[str, str]

    def run(self, *cmd: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=120, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str | os.PathLike, cwd: Path = ROOT) -> int:
        return int(self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (finished jobs stay listed for MinJobAge, no accounting database needed)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.split()
        return dict(field.split("=", 1) for field in out if "=" in field)

    def state_of(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def wait(self, job_id: int, timeout: float = 300, log: Path | None = None) -> dict[str, str]:
        """Poll until the job ends; fail with its log if it does not end in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in TERMINAL_STATES:
                return info
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        text = log.read_text() if log and log.exists() else "(no log)"
        raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s; log:\n{text[-3000:]}")


def slurm_missing() -> str | None:
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "srun") if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not installed: run scripts/install_test_services.sh"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    # Not under pytest's 0700 tmp dirs: munged runs as the munge user and must reach its own socket dir.
    state = Path(tempfile.mkdtemp(prefix="clip-hpc-slurm-"))
    os.chmod(state, 0o755)
    env = {
        **os.environ,
        "CLIP_HPC_SLURM_DIR": str(state),
        "CLIP_HPC_SLURM_PORT": str(_two_free_ports()),
        "SLURM_CONF": str(state / "slurm.conf"),
        "CLIP_HPC_PROFILE": "local",
        "CLIP_HPC_HOME": str(ROOT),
    }
    up = subprocess.run([str(SLURM_LOCAL), "up"], capture_output=True, text=True, env=env, timeout=180)
    try:
        assert up.returncode == 0, f"slurm-local.sh up failed:\n{up.stdout}{up.stderr}"
        assert f"export SLURM_CONF={state}/slurm.conf" in up.stdout
        yield SlurmCluster(state, env)
    finally:
        subprocess.run([str(SLURM_LOCAL), "down"], capture_output=True, text=True, env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def perlmutter_like_profile(
    path: Path, *, data: Path, weights: Path, gpus: int = 4, account: str = "m1234", srun_mpi: str = ""
) -> Path:
    """A profile in Perlmutter's shape (constraint, QOS and account through SBATCH_*, GPUs per node, a weights
    cache, HF_HUB_OFFLINE in jobs) on the local cluster's small task counts; it ends like local.sh."""
    path.write_text(
        f"""# test profile: Perlmutter's kind of settings on the local cluster
: "${{SBATCH_CONSTRAINT:=gpu}}"
: "${{SBATCH_QOS:=regular}}"
: "${{SBATCH_ACCOUNT:={account}}}"
export SBATCH_CONSTRAINT SBATCH_QOS SBATCH_ACCOUNT
: "${{CLIP_HPC_GPUS_PER_NODE:={gpus}}}"
{f': "${{CLIP_HPC_SRUN_MPI:={srun_mpi}}}"' if srun_mpi else ""}
: "${{CLIP_HPC_DATA:={data}}}"
: "${{CLIP_HPC_WEIGHTS:={weights}}}"
export CLIP_HPC_WEIGHTS
if [ -n "${{SLURM_JOB_ID:-}}" ]; then export HF_HUB_OFFLINE=1; fi
source "$CLIP_HPC_HOME/hpc/local.sh"
"""
    )
    return path
