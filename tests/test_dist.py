import subprocess
import sys

import pytest

from clip_hpc.cluster.world import World, speaks_for_job, world, world_from_env
from conftest import BIN


def test_env_fallbacks_in_order():
    assert world_from_env({}) == World()
    slurm = world_from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                            "SLURM_NTASKS_PER_NODE": "4", "RANK": "0", "WORLD_SIZE": "2"})
    assert (slurm.rank, slurm.size, slurm.local_rank, slurm.local_size, slurm.backend) == (3, 8, 1, 4, "slurm")
    torchrun = world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (torchrun.rank, torchrun.size, torchrun.local_rank, torchrun.backend) == (1, 2, 1, "torchrun")
    assert world_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "2"}) == World()  # inconsistent -> single


@pytest.mark.mpi
def test_mpiexec_gives_ranks_and_a_working_gather(tmp_path):
    code = ("import sys; from clip_hpc.cluster.world import world; w = world(); "
            "open(f'{sys.argv[1]}/r{w.rank}', 'w').write(f'{w.rank} {w.size} {w.backend} {w.gather(w.rank * 10)}')")
    subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                   text=True, timeout=120, check=True)
    assert (tmp_path / "r0").read_text() == "0 2 mpi [0, 10]"
    assert (tmp_path / "r1").read_text() == "1 2 mpi None"


def test_single_process_without_launcher_never_loads_mpi():
    code = "import sys; from clip_hpc.cluster.world import world; w = world(); print(w.size, 'mpi4py.MPI' in sys.modules)"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("PMI", "SLURM", "OMPI", "HYDRA"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["1", "False"]


def test_who_speaks_for_the_job():
    assert speaks_for_job(World())
    assert speaks_for_job(World(rank=0, size=4, comm=object()))
    assert not speaks_for_job(World(rank=1, size=4, comm=object()))
    assert speaks_for_job(World(rank=1, size=4))  # ranks that cannot talk each speak for themselves


def test_world_is_discovered_once_per_process():
    assert world() is world()
