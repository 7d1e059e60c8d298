import subprocess
import sys
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from clip_hpc.cluster.collective import RankFailed, all_or_none, from_root, on_every_rank
from clip_hpc.cluster.world import World, speaks_for_job, world, world_from_env
from clip_hpc.errors import UserError
from conftest import BIN


def test_env_fallbacks_in_order():
    assert world_from_env({}) == World()
    slurm_vars = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"}
    slurm = world_from_env(slurm_vars)
    assert (slurm.rank, slurm.size, slurm.local_rank, slurm.local_size, slurm.backend) == (3, 8, 1, 4, "slurm")
    # torchrun runs under srun, so its variables (set per worker) win over the srun task's they inherit
    assert world_from_env({**slurm_vars, "RANK": "0", "WORLD_SIZE": "2"}).backend == "torchrun"
    torchrun = world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (torchrun.rank, torchrun.size, torchrun.local_rank, torchrun.backend) == (1, 2, 1, "torchrun")
    assert world_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "2"}) == World()  # inconsistent -> single


@pytest.mark.mpi
def test_mpiexec_gives_ranks_and_a_working_gather(tmp_path):
    code = (
        "import sys; from clip_hpc.cluster.world import world; w = world(); "
        "open(f'{sys.argv[1]}/r{w.rank}', 'w').write(f'{w.rank} {w.size} {w.backend} {w.gather(w.rank * 10)}')"
    )
    subprocess.run(
        [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert (tmp_path / "r0").read_text() == "0 2 mpi [0, 10]"
    assert (tmp_path / "r1").read_text() == "1 2 mpi None"


def test_single_process_without_launcher_never_loads_mpi():
    code = (
        "import sys; from clip_hpc.cluster.world import world; w = world(); print(w.size, 'mpi4py.MPI' in sys.modules)"
    )
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


class _ThreadRanks:
    """Two ranks as two threads, with just enough MPI (Ibarrier, allgather, bcast) for the failure protocol."""

    def __init__(self) -> None:
        self.meet, self.slots = threading.Barrier(2, timeout=30), [None, None]

    def comm(self, rank: int) -> Any:
        ranks = self

        class Comm:
            def Ibarrier(self) -> Any:
                return SimpleNamespace(Test=lambda: ranks.meet.wait() is not None)

            def allgather(self, obj: Any) -> list[Any]:
                ranks.slots[rank] = obj
                ranks.meet.wait()
                out = list(ranks.slots)
                ranks.meet.wait()
                return out

            def bcast(self, obj: Any, root: int = 0) -> Any:
                return self.allgather(obj)[root]

        return Comm()

    def run(self, step: Callable[[World], Any]) -> list[Any]:
        """Each rank's result or the exception it raised."""
        outcomes: list[Any] = [None, None]

        def one(rank: int) -> None:
            try:
                outcomes[rank] = step(World(rank, 2, rank, 2, "mpi", self.comm(rank)))
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                outcomes[rank] = exc

        threads = [threading.Thread(target=one, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return outcomes


def test_a_bug_on_one_rank_is_one_line_everywhere_and_one_traceback(capsys):
    def step(w: World) -> int:
        if w.rank == 1:
            raise ValueError("boom")
        return w.rank

    zero, one = _ThreadRanks().run(lambda w: all_or_none(w, lambda: step(w)))
    assert isinstance(zero, RankFailed) and str(zero) == "rank 1 failed: ValueError: boom"
    assert type(one) is UserError and str(one) == "ValueError: boom"  # a one-liner, not the bug itself
    assert capsys.readouterr().err.count("Traceback") == 1  # printed where it happened, once


def _raise(error: BaseException) -> Any:
    raise error


def test_user_errors_stay_themselves_on_the_failing_rank_and_results_are_shared():
    problem = UserError("no images")
    zero, one = _ThreadRanks().run(lambda w: from_root(w, lambda: _raise(problem)))
    assert zero is problem and isinstance(one, RankFailed) and str(one) == "rank 0 failed: no images"
    assert _ThreadRanks().run(lambda w: from_root(w, lambda: f"plan of rank {w.rank}")) == ["plan of rank 0"] * 2
    assert _ThreadRanks().run(lambda w: on_every_rank(w, lambda: w.rank * 10)) == [[0, 10], [0, 10]]
    disk = OSError(28, "No space left on device", "/out/s.h5")
    zero, one = _ThreadRanks().run(lambda w: all_or_none(w, lambda: _raise(disk) if w.rank else 0))
    assert one is disk and str(zero).startswith("rank 1 failed: No space left on device: /out/s.h5")


def test_a_lone_process_raises_a_bug_as_it_is():
    with pytest.raises(ZeroDivisionError):
        all_or_none(World(), lambda: 1 // 0)
    assert from_root(World(), lambda: "plan") == "plan" and on_every_rank(World(), lambda: 7) == [7]
