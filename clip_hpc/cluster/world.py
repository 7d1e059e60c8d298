"""Who am I: rank, world size and local rank, from MPI, SLURM, torchrun or nothing.

MPI comes first because it also gives us a barrier and a gather; the environment fallbacks keep a job useful
when mpi4py cannot load an MPI library (each rank then works alone on its share, and shards still join up).
"""
from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from clip_hpc.errors import UserError, os_error_message

T = TypeVar("T")

_MPI_HINTS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
              "HYDRA_CONTROL_FD", "MPICH_INTERFACE_HOSTNAME")


@dataclass(frozen=True)
class World:
    """The process's place in the job. `comm` is an mpi4py communicator when MPI is up, else None."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "single"
    comm: Any = None

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """All ranks' objects on rank 0 (None elsewhere); without MPI, just this rank's."""
        if self.comm is not None:
            return self.comm.gather(obj, root=0)
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        if self.comm is not None:
            return self.comm.allgather(obj)
        return [obj]

    def bcast(self, obj: Any) -> Any:
        if self.comm is not None:
            return self.comm.bcast(obj, root=0)
        return obj

    def all_or_none(self, step: Callable[[], T]) -> T:
        """Run `step` on this rank; if it fails on ANY rank, every rank raises the same one-line UserError.

        Every rank calls this at the same point, so no rank is left waiting in a collective for one that died
        (a read-only --out, a full disk, a bug). A bug's traceback is printed by the rank it happened on."""
        result: Any = None
        try:
            result, problem = step(), None
        except UserError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = os_error_message(exc)
        except Exception as exc:
            if self.size == 1:
                raise
            traceback.print_exc()
            problem = f"{type(exc).__name__}: {exc}"
        if self.size > 1 and problem:
            problem = f"rank {self.rank}: {problem}"
        problems = [p for p in self.allgather(problem) if p]
        if problems:
            raise UserError(problems[0])
        return result

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def coordinated(self) -> bool:
        """True when ranks can talk (MPI) or there is only one: then rank 0 may speak for the job."""
        return self.comm is not None or self.size == 1


def _env_int(env: dict[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip().lstrip("-").isdigit():
            return int(env[name])
    return None


def world_from_env(env: dict[str, str] | None = None) -> World:
    """SLURM variables, else torchrun variables, else a single process. Pure: easy to test."""
    env = dict(os.environ if env is None else env)
    for backend, rank_v, size_v, local_v, local_size_v in (
        ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ):
        rank, size = _env_int(env, rank_v), _env_int(env, size_v)
        if rank is not None and size is not None and size >= 1 and 0 <= rank < size:
            local = _env_int(env, local_v) or 0
            local_size = _env_int(env, local_size_v) or 1
            return World(rank, size, local, max(local_size, local + 1), backend)
    return World()


def _mpi_world() -> World | None:
    try:
        from mpi4py import MPI
    except Exception as exc:  # no libmpi, wrong ABI, ...
        if any(v in os.environ for v in _MPI_HINTS):
            warnings.warn(f"MPI launch variables are set but mpi4py cannot load MPI ({exc}); running without it")
        return None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return World(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), "mpi", comm)


def speaks_for_job(w: World) -> bool:
    """Whether this process should print job-wide messages: rank 0, or any rank when ranks cannot talk."""
    return w.is_root or not w.coordinated


@functools.cache
def world() -> World:
    """Discover once per process; MPI only when a launcher hints at it, so plain runs never pay MPI start-up."""
    found = None
    if any(v in os.environ for v in _MPI_HINTS) or os.environ.get("CLIP_HPC_FORCE_MPI"):
        found = _mpi_world()
        if found is not None and found.size == 1 and world_from_env().size > 1:
            found = None  # e.g. srun without --mpi=pmi2: each task is an MPI singleton
    env_world = world_from_env()
    if found is None and env_world.size > 1 and env_world.backend == "slurm" and "PMI_FD" not in os.environ:
        print(f"clip-hpc: rank {env_world.rank}/{env_world.size} from SLURM variables, without MPI "
              "(use srun --mpi=pmi2 for a coordinated job)", file=sys.stderr)
    return found or env_world
