"""The sbatch path on a real local SLURM cluster: MPI ranks under srun, the embed job, a requeue mid-run, and the
whole pipeline (embed -> index -> serve) answered over HTTP."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from clip_hpc.formats.emb_dir import EmbDir
from conftest import BIN, ROOT, make_images
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

TINY = ("--model", "clip-hpc-tiny", "--pretrained", "none")
TWO_TASKS = ("--ntasks=2", "--cpus-per-task=1")


@pytest.fixture(scope="module")
def images_120(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("slurm") / "images", 120, seed=3)


def profile_vars(profile: str, *names: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Source hpc/PROFILE.sh the way the sbatch scripts do (no module system, no job) and read variables back."""
    script = f'source "$CLIP_HPC_HOME/hpc/{profile}.sh" && ' + " && ".join(f'echo "{n}=${{{n}:-}}"' for n in names)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "CLIP_HPC_", "SLURM_"))}
    proc = subprocess.run(
        ["bash", "-euc", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, "CLIP_HPC_HOME": str(ROOT), "SCRATCH": "/scratch/u", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_profiles_set_what_the_scripts_need() -> None:
    names = (
        "CLIP_HPC_VENV",
        "CLIP_HPC_SRUN_MPI",
        "CLIP_HPC_GPUS_PER_NODE",
        "CLIP_HPC_EMBED_SBATCH",
        "CLIP_HPC_LOGIN_HOST",
        "CLIP_HPC_DATA",
        "SBATCH_CONSTRAINT",
        "SBATCH_QOS",
        "SBATCH_ACCOUNT",
        "PATH",
    )
    generic = profile_vars("generic", *names)
    assert generic["CLIP_HPC_VENV"] == str(ROOT / ".venv") and generic["CLIP_HPC_SRUN_MPI"] == "pmi2"
    assert generic["PATH"].split(":")[0] == str(ROOT / ".venv" / "bin")
    assert generic["SBATCH_CONSTRAINT"] == "" and generic["CLIP_HPC_GPUS_PER_NODE"] == "0"
    local = profile_vars("local", "SLURM_CONF", *names, env={"CLIP_HPC_SLURM_DIR": "/tmp/x"})
    assert local["SLURM_CONF"] == "/tmp/x/slurm.conf" and "--ntasks=2" in local["CLIP_HPC_EMBED_SBATCH"]
    pm = profile_vars("perlmutter", *names, env={"CLIP_HPC_ACCOUNT": "m1234"})
    assert (pm["SBATCH_CONSTRAINT"], pm["SBATCH_QOS"], pm["SBATCH_ACCOUNT"]) == ("gpu", "regular", "m1234")
    assert pm["CLIP_HPC_GPUS_PER_NODE"] == "4" and "--ntasks-per-node=4" in pm["CLIP_HPC_EMBED_SBATCH"]
    assert "--gpus-per-task=1" in pm["CLIP_HPC_EMBED_SBATCH"] and pm["CLIP_HPC_DATA"] == "/scratch/u/clip-hpc"
    assert pm["CLIP_HPC_LOGIN_HOST"].endswith("@perlmutter.nersc.gov")
    assert profile_vars("perlmutter", "SBATCH_ACCOUNT")["SBATCH_ACCOUNT"] == "", "no empty --account for sbatch"


def test_unknown_profile_and_bad_pipeline_use_fail_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "CLIP_HPC_PROFILE": "nosuchcluster", "CLIP_HPC_HOME": str(ROOT)}
    proc = subprocess.run(
        ["bash", ROOT / "slurm" / "embed.sbatch", "x", "--out", tmp_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 2 and "no profile 'nosuchcluster'" in proc.stderr
    assert all(p in proc.stderr for p in ("generic", "local", "perlmutter")), "the error lists the profiles"
    proc = subprocess.run([ROOT / "slurm" / "pipeline.sh", tmp_path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr.lower()


def id_counts(emb_dir: Path) -> Counter:
    """How often each global id (embedded or failed) appears across the shards."""
    counts: Counter = Counter()
    for shard in EmbDir(emb_dir).iter_shards(with_embeddings=False):
        counts.update(int(i) for i in shard.ids)
        counts.update(int(i) for i in shard.failed_ids)
    return counts


def assert_covers_once(emb_dir: Path, n: int) -> None:
    counts = id_counts(emb_dir)
    assert sorted(counts) == list(range(n)), f"ids missing or extra: {sorted(set(range(n)) ^ set(counts))[:10]}"
    assert max(counts.values()) == 1, f"ids in more than one shard: {[i for i, c in counts.items() if c > 1][:10]}"


@pytest.mark.slurm
@pytest.mark.slow
def test_srun_starts_two_mpi_ranks(slurm_cluster: SlurmCluster) -> None:
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.Get_rank(), c.Get_size())"
    out = slurm_cluster.run("srun", "-n", "2", "--mpi=pmi2", BIN / "python", "-c", code).stdout
    assert sorted(out.split("\n")[:2]) == ["0 2", "1 2"], out


@pytest.mark.slurm
@pytest.mark.slow
def test_embed_sbatch_two_tasks_covers_every_id_once(
    slurm_cluster: SlurmCluster, images_120: Path, tmp_path: Path
) -> None:
    emb, log = tmp_path / "emb", tmp_path / "embed.log"
    job = slurm_cluster.sbatch(
        *TWO_TASKS,
        f"--output={log}",
        ROOT / "slurm" / "embed.sbatch",
        images_120,
        "--out",
        emb,
        *TINY,
        "--shard-size",
        "20",
    )
    info = slurm_cluster.wait(job, log=log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    manifest = json.loads((emb / "manifest.json").read_text())
    assert manifest["n_inputs"] == 120 and len(manifest["shards"]) == 6
    assert_covers_once(emb, 120)
    ranks = {shard.attrs["rank"] for shard in EmbDir(emb).iter_shards(with_embeddings=False)}
    assert ranks == {0, 1}, "both srun tasks should have written shards, as ranks of one MPI world"
    assert "2 rank(s) [mpi]" in log.read_text()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def shard_stamps(emb_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in EmbDir(emb_dir).shard_files()}


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_embed_resumes_without_recomputing(
    slurm_cluster: SlurmCluster, images_120: Path, tmp_path: Path
) -> None:
    n, unit, images = 120, 10, images_120
    emb, log = tmp_path / "emb", tmp_path / "embed.log"
    # Small batches and no DataLoader workers: slow enough to catch the job between its first and last shard.
    job = slurm_cluster.sbatch(
        *TWO_TASKS,
        f"--output={log}",
        ROOT / "slurm" / "embed.sbatch",
        images,
        "--out",
        emb,
        *TINY,
        "--shard-size",
        str(unit),
        "--batch-size",
        "2",
        "--workers",
        "0",
    )
    wait_for(lambda: EmbDir(emb).shard_files() if (emb / "shards").is_dir() else [], 240, "the first shard")
    slurm_cluster.run("scontrol", "requeue", str(job))
    # Once the killed run's processes are gone the job waits to start again: what is on disk now is its work.
    wait_for(lambda: slurm_cluster.state_of(job) == "PENDING", 60, "the requeued job to be pending", poll=0.2)
    before = shard_stamps(emb)
    assert 1 <= len(before) < n // unit, f"the job was not caught mid-run ({len(before)} shards)"
    assert not (emb / "manifest.json").exists()

    info = slurm_cluster.wait(job, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert info["Restarts"] == "1"
    assert "restart 0 on" in text and "restart 1 on" in text, "the log (open-mode=append) shows both runs"
    assert_covers_once(emb, n)
    after = shard_stamps(emb)
    assert len(after) == n // unit
    assert {name: after[name] for name in before} == before, "shards of the first run were rewritten"
    # The restarted run embedded exactly the images of the units that were missing, nothing more.
    this_run = int(re.findall(r"this run: (\d+) images", text)[-1])
    assert this_run == n - len(before) * unit
    assert json.loads((emb / "manifest.json").read_text())["n_embedded"] == n


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_embed_index_serve_answers_a_query(
    slurm_cluster: SlurmCluster, images_120: Path, tmp_path: Path
) -> None:
    conn = tmp_path / "connection.json"
    env = {**slurm_cluster.env, "CLIP_HPC_CONNECTION_FILE": str(conn)}
    out = slurm_cluster.run(
        ROOT / "slurm" / "pipeline.sh",
        "--serve",
        tmp_path / "work",
        images_120,
        "--",
        *TINY,
        "--shard-size",
        "30",
        env=env,
    ).stdout
    jobs = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert set(jobs) == {"embed", "index", "serve", "connection_file"} and jobs["connection_file"] == str(conn)
    logs = tmp_path / "work" / "logs"
    try:
        for stage in ("embed", "index"):
            job = int(jobs[stage])
            info = slurm_cluster.wait(job, log=logs / f"clip-{stage}-{job}.out")
            assert info["JobState"] == "COMPLETED", (logs / f"clip-{stage}-{job}.out").read_text()[-3000:]
        assert json.loads((tmp_path / "work" / "index" / "index.json").read_text())["n"] == 120

        serve_log = logs / f"clip-serve-{jobs['serve']}.out"

        def tunnel_line() -> str | None:  # printed by serve.sbatch once the server wrote its connection file
            lines = serve_log.read_text().splitlines() if serve_log.exists() else []
            return next((line for line in lines if line.strip().startswith("ssh -N -L")), None)

        tunnel = wait_for(tunnel_line, 180, "the tunnel command in the serve job's log", poll=0.5)
        info = json.loads(conn.read_text())
        resp = httpx.get(
            f"http://127.0.0.1:{info['port']}/api/search",
            params={"q": "a red circle", "k": 5},
            headers={"Authorization": f"Bearer {info['token']}"},
            timeout=60,
            trust_env=False,
        )
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert len(results) == 5 and all(0 <= r["id"] < 120 for r in results)
        assert all(Path(r["path"]).parent.parent == images_120 for r in results)

        assert info["host"] in tunnel and slurm_cluster.env.get("CLIP_HPC_LOGIN_HOST", "@127.0.0.1") in tunnel
        assert stat.S_IMODE(os.stat(serve_log).st_mode) == 0o600, "the log holds the token"
    finally:
        slurm_cluster.run("scancel", *(jobs[s] for s in ("embed", "index", "serve")), check=False)
