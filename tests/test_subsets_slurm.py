"""slurm/filter.sbatch on the local SLURM cluster: two srun tasks as ranks of one MPI world give the same subset as
one process, and write its tars between them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clip_hpc.cluster.world import World
from clip_hpc.subsets import FilterOptions, filter_subset
from conftest import ROOT
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)
from subsets_fixtures import Source, mixed_source  # noqa: F401  (the fixture)


@pytest.mark.slurm
@pytest.mark.slow
def test_filter_sbatch_two_tasks_equals_one_process(
    slurm_cluster: SlurmCluster, mixed_source: Source, tmp_path: Path
) -> None:
    out, log = tmp_path / "subset", tmp_path / "filter.log"
    job = slurm_cluster.sbatch(
        "--ntasks=2", "--cpus-per-task=1", f"--output={log}", ROOT / "slurm" / "filter.sbatch",
        mixed_source.emb, "--out", out, "--text", "a red kite", "--threshold", "-0.05", "--to", "tars",
        "--samples-per-tar", "4",
    )  # fmt: skip
    info = slurm_cluster.wait(job, log=log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    filter_subset(
        FilterOptions(str(mixed_source.emb), str(tmp_path / "one"), texts=("a red kite",), threshold=-0.05,
                      to=("tars",), samples_per_tar=4, progress=False),
        World(),
    )  # fmt: skip
    assert pq.read_table(out / "results.parquet").equals(pq.read_table(tmp_path / "one" / "results.parquet"))
    report = json.loads((out / "filter.json").read_text())
    assert report["ranks"] == 2 and report["counts"]["kept"] > 0
    tars = sorted(p.name for p in (out / "tars").glob("*.tar"))
    assert tars == sorted(p.name for p in (tmp_path / "one" / "tars").glob("*.tar")) and len(tars) >= 2
    for name in tars:
        assert (out / "tars" / name).read_bytes() == (tmp_path / "one" / "tars" / name).read_bytes()
    assert "=== clip-hpc filter: job" in log.read_text()
