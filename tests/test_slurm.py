"""The sbatch path on a real local SLURM cluster: MPI ranks under srun, the embed job, a requeue mid-run, and the
whole pipeline (embed -> index -> serve) answered over HTTP."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from clip_hpc.formats.emb_dir import EmbDir
from conftest import BIN, ROOT, make_images
from slurm_fixtures import SlurmCluster, perlmutter_like_profile, slurm_cluster  # noqa: F401  (the fixture)

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
    assert "--gpus-per-node=4 --gpu-bind=none" in pm["CLIP_HPC_EMBED_SBATCH"]  # NERSC's GPU jobs: unbound GPUs
    assert pm["CLIP_HPC_DATA"] == "/scratch/u/clip-hpc"
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
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        assert tunnel.strip().endswith(f"-J {user}@127.0.0.1 {user}@{info['host']}"), "the user on both hops"
        assert stat.S_IMODE(os.stat(serve_log).st_mode) == 0o600, "the log holds the token"
    finally:
        slurm_cluster.run("scancel", *(jobs[s] for s in ("embed", "index", "serve")), check=False)


def submit_job(cluster: SlurmCluster, *args: str | Path, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """`clip-hpc submit ...` as a user on the login node: the job id and the sbatch command it printed."""
    proc = cluster.run(BIN / "clip-hpc", "submit", *args, env=env or cluster.env)
    printed = next(line for line in proc.stderr.splitlines() if line.startswith("$ sbatch "))
    return int(proc.stdout.split()[-1]), shlex.split(printed[2:])


@pytest.mark.slurm
@pytest.mark.slow
def test_submitted_and_hand_submitted_gpu_jobs_carry_the_profile_and_stop_without_gpus(
    slurm_cluster: SlurmCluster, images_120: Path, tmp_path: Path
) -> None:
    """The profile's constraint, QOS and account reach sbatch as options (the job record shows the constraint and
    the account; this cluster keeps no QOS), and a GPU job placed where there are no GPUs stops with one line."""
    profile = perlmutter_like_profile(tmp_path / "pm.sh", data=tmp_path / "data", weights=tmp_path / "w")
    args = ("embed", images_120, "--out", tmp_path / "emb", *TINY)
    job, command = submit_job(slurm_cluster, "--profile", profile, *args)
    assert {"--constraint=gpu", "--qos=regular", "--account=m1234"} <= set(command)
    test_only = slurm_cluster.run(command[0], "--test-only", *command[1:], check=False)
    assert test_only.returncode == 0, test_only.stderr
    log = tmp_path / "data" / "logs" / f"clip-embed-{job}.out"
    info = slurm_cluster.wait(job, log=log)
    assert (info["Features"], info["Account"], info["JobState"]) == ("gpu", "m1234", "FAILED")
    errors = [line for line in log.read_text().splitlines() if "error:" in line]
    assert len(errors) == 1 and "expects 4 GPU(s) per node and this job has none" in errors[0], errors

    by_hand = tmp_path / "by-hand.out"  # sbatch slurm/embed.sbatch without the profile's options: no GPUs either
    hand_env = {**slurm_cluster.env, "CLIP_HPC_PROFILE": str(profile)}
    submitted = slurm_cluster.run(
        "sbatch", "--parsable", f"--output={by_hand}", ROOT / "slurm" / "embed.sbatch", *args[1:], env=hand_env
    )
    job = int(submitted.stdout.strip().split(";")[0])
    assert slurm_cluster.wait(job, log=by_hand)["JobState"] == "FAILED"
    assert "this job has none: submit with 'clip-hpc submit embed" in by_hand.read_text()
    assert not (tmp_path / "emb" / "shards").exists() or not any((tmp_path / "emb" / "shards").iterdir())


@pytest.mark.slurm
@pytest.mark.slow
def test_index_job_without_mpi_builds_on_rank_0_and_the_other_ranks_exit_0(
    slurm_cluster: SlurmCluster, images_120: Path, tmp_path: Path
) -> None:
    """srun without a working MPI plugin: each task is its own world. Rank 0 builds the whole index, rank 1 has
    nothing to do and says so once with exit 0 (exit 2 made --kill-on-bad-exit kill rank 0's build)."""
    from conftest import run_cli

    emb = tmp_path / "emb"
    run_cli("embed", images_120, "--out", emb, *TINY, "--shard-size", "30", check=True)
    env = {**slurm_cluster.env, "CLIP_HPC_SRUN_MPI": "none"}
    job, command = submit_job(
        slurm_cluster,
        "--log-dir",
        tmp_path / "logs",
        "index",
        "--ntasks=2",
        "--",
        emb,
        "--out",
        tmp_path / "idx",
        env=env,
    )
    log = tmp_path / "logs" / f"clip-index-{job}.out"
    info = slurm_cluster.wait(job, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["n"] == 120
    idle = [line for line in text.splitlines() if "cannot reach the others" in line]
    assert len(idle) == 1 and "rank 1 of 2" in idle[0] and "srun --mpi=none" in idle[0], idle


@pytest.mark.slurm
@pytest.mark.slow
def test_fetch_model_then_a_submitted_job_find_the_same_weights(
    slurm_cluster: SlurmCluster, images_120: Path, tmp_path: Path
) -> None:
    """fetch-model on the login node fills the profile's weights cache; the job (HF_HUB_OFFLINE, the same profile
    sourced inside it) loads them from there: the shipped demo weights, no download."""
    weights = tmp_path / "weights"
    profile = perlmutter_like_profile(tmp_path / "pm.sh", data=tmp_path / "data", weights=weights, gpus=0)
    login_env = {k: v for k, v in slurm_cluster.env.items() if not k.startswith(("CLIP_HPC_WEIGHTS", "HF_"))}
    fetched = slurm_cluster.run(
        BIN / "clip-hpc", "fetch-model", "--profile", profile, "clip-hpc-demo", "bundled", env=login_env
    )
    assert Path(fetched.stdout.strip()) == weights / "clip-hpc-demo.safetensors"
    emb = tmp_path / "emb"
    job, _ = submit_job(
        slurm_cluster,
        "--profile",
        profile,
        "embed",
        images_120,
        "--out",
        emb,
        "--model",
        "clip-hpc-demo",
        "--pretrained",
        "bundled",
        "--shard-size",
        "60",
        env=login_env,
    )
    log = tmp_path / "data" / "logs" / f"clip-embed-{job}.out"
    info = slurm_cluster.wait(job, log=log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert json.loads((emb / "manifest.json").read_text())["n_embedded"] == 120
    assert {s.attrs["pretrained"] for s in EmbDir(emb).iter_shards(with_embeddings=False)} == {"bundled"}
