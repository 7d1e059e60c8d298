"""Resume and exactly-once for `clip-hpc filter`: a run killed with SIGKILL mid-scan and again mid-tars, then re-run,
ends with the same results and byte-identical tars as an uninterrupted run (every sample once, no half-written tar
taken for whole); a re-run with other settings into the same --out is refused in one line; an error on one MPI rank
stops every rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clip_hpc.cluster.world import World
from clip_hpc.errors import UserError
from clip_hpc.subsets import FilterOptions, filter_subset
from conftest import BIN, run_cli
from subsets_fixtures import Source, mixed_source  # noqa: F401  (the fixture)

QUERY = ("--text", "a red kite", "--negative", "a blue boat", "--threshold", "-1")
OPTIONS = {"texts": ("a red kite",), "negatives": ("a blue boat",), "threshold": -1.0}
DEAD_PID = 2**22 + 12345  # above any pid_max: certainly not a live writer


def kill_when(cmd: list[str], ready, timeout: float = 120) -> None:
    """Start `cmd` in its own session, stop it the moment `ready()` holds, then SIGKILL it: a pre-emption."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def files(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def test_killed_twice_then_rerun_equals_an_uninterrupted_run(mixed_source: Source, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    filter_subset(
        FilterOptions(str(mixed_source.emb), str(whole), to=("tars",), samples_per_tar=1, progress=False, **OPTIONS),
        World(),
    )
    n_units, n_tars = len(files(whole / "parts", "unit-*")), len(files(whole / "tars", "*.tar"))
    assert n_units == 6 and n_tars > 10
    cmd = [str(BIN / "clip-hpc"), "filter", str(mixed_source.emb), "--out", str(killed), *QUERY]
    cmd += ["--to", "tars", "--samples-per-tar", "1", "--quiet"]
    kill_when(cmd, lambda: len(files(killed / "parts", "unit-*")) >= 1)
    assert 1 <= len(files(killed / "parts", "unit-*")) < n_units, "killed mid-scan"
    assert not (killed / "results.parquet").exists()
    kill_when(cmd, lambda: len(files(killed / "tars", "*.tar")) >= 2)
    assert 2 <= len(files(killed / "tars", "*.tar")) < n_tars, "killed mid-tars"
    # what a writer killed inside a tar leaves: a temporary name, never the tar's own
    last = f"{n_tars - 1:05d}.tar"
    half = (whole / "tars" / last).read_bytes()[:700]
    (killed / "tars" / f".{last}.tmp.{socket.gethostname()}.{DEAD_PID}").write_bytes(half)
    filter_subset(
        FilterOptions(str(mixed_source.emb), str(killed), to=("tars",), samples_per_tar=1, progress=False, **OPTIONS),
        World(),
    )
    assert pq.read_table(killed / "results.parquet").equals(pq.read_table(whole / "results.parquet"))
    assert [p.name for p in files(killed / "tars", "*")] == [p.name for p in files(whole / "tars", "*")]
    assert not [p for p in (killed / "tars").iterdir() if p.name.startswith(".")], "stale temporaries removed"
    for tar in files(whole / "tars", "*.tar"):
        assert (killed / "tars" / tar.name).read_bytes() == tar.read_bytes(), tar.name
    report = json.loads((killed / "filter.json").read_text())
    assert report["counts"]["units_skipped"] == n_units and 2 <= report["counts"]["tars_skipped"] < n_tars


def test_rerun_with_other_settings_is_refused_in_one_line(mixed_source: Source, tmp_path):
    out = tmp_path / "out"
    filter_subset(FilterOptions(str(mixed_source.emb), str(out), progress=False, **OPTIONS), World())
    with pytest.raises(UserError, match="other settings"):
        filter_subset(FilterOptions(str(mixed_source.emb), str(out), progress=False, **{**OPTIONS, "threshold": 0.1}))
    filter_subset(FilterOptions(str(mixed_source.emb), str(out), progress=False, **OPTIONS), World())  # same: fine
    proc = run_cli("filter", mixed_source.emb, "--out", out, "--text", "a dog", "--threshold", "-1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "texts" in proc.stderr, proc.stderr
    for bad, says in [
        ({"source": str(tmp_path), "texts": ("a",), "top": 3}, "neither an EMB_DIR"),
        ({"texts": (), "top": 3}, "positive query"),
        ({"images": (str(tmp_path / "no.png"),), "top": 3}, "no such file"),
        ({"texts": ("a",), "top": 3, "threshold": 0.2}, "exactly one of"),
        ({"texts": ("a",), "top": 0}, "at least 1"),
    ]:
        options = {"source": str(mixed_source.emb), "out": str(tmp_path / "bad"), "progress": False, **bad}
        with pytest.raises(UserError, match=says):
            filter_subset(FilterOptions(**options), World())  # type: ignore[arg-type]


@pytest.mark.mpi
def test_an_error_on_one_rank_stops_both(mixed_source: Source, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(mixed_source.emb, emb)
    shard = emb / "shards" / "shard-000003.h5"  # unit 3: rank 1's under two ranks
    shard.write_bytes(shard.read_bytes()[:300])
    proc = subprocess.run(
        [str(BIN / "mpiexec"), "-n", "2", str(BIN / "clip-hpc"), "filter", str(emb), "--out", str(tmp_path / "o"),
         *QUERY, "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"clip-hpc filter: error: rank 1 failed: {shard}: unreadable")
    assert not (tmp_path / "o" / "results.parquet").exists() and not list((tmp_path / "o" / "parts").glob("*3*"))
