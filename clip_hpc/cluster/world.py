"""Who am I: rank, world size and local rank, from MPI, SLURM, torchrun or nothing.

MPI comes first because it also gives us a barrier and a gather; the environment fallbacks keep a job useful
when mpi4py cannot load an MPI library (each rank then works alone on its share, and shards still join up).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clip_hpc.cluster.jobenv import JobEnv, job_env


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

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def coordinated(self) -> bool:
        """True when ranks can talk (MPI) or there is only one: then rank 0 may speak for the job."""
        return self.comm is not None or self.size == 1


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """SLURM variables, else torchrun variables, else a single process. Pure for a given mapping: easy to test."""
    place = (job_env() if env is None else JobEnv.from_mapping(env)).launcher_place
    return World(place.rank, place.size, place.local_rank, place.local_size, place.backend) if place else World()


def _mpi_world() -> World | None:
    try:
        from mpi4py import MPI
    except Exception as exc:  # no libmpi, wrong ABI, ...
        if job_env().mpi_launched:
            warnings.warn(
                f"MPI launch variables are set but mpi4py cannot load MPI ({exc}); running without it", stacklevel=2
            )
        return None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return World(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), "mpi", comm)


def idle_without_mpi(w: World) -> str | None:
    """Why this rank has nothing to do, or None: ranks that cannot talk leave a job that rank 0 does alone (the
    index), and the others end with exit 0: a non-zero exit would make srun --kill-on-bad-exit kill rank 0 too."""
    if w.coordinated or w.is_root:
        return None
    return (
        f"rank {w.rank} of {w.size} cannot reach the others (no MPI): rank 0 works alone, this rank exits; "
        f"use {job_env().mpi_hint} for all ranks to share the work"
    )


def speaks_for_job(w: World) -> bool:
    """Whether this process should print job-wide messages: rank 0, or any rank when ranks cannot talk."""
    return w.is_root or not w.coordinated


@functools.cache
def world() -> World:
    """Discover once per process; MPI only when a launcher hints at it, so plain runs never pay MPI start-up."""
    found = None
    env = job_env()
    if env.mpi_launched or env.force_mpi:
        found = _mpi_world()
        if found is not None and found.size == 1 and world_from_env().size > 1:
            found = None  # e.g. srun without the right --mpi plugin: each task is an MPI singleton
    env_world = world_from_env()
    if found is None and env_world.size > 1 and env_world.backend == "slurm" and "PMI_FD" not in env.mpi_hints:
        print(
            f"clip-hpc: rank {env_world.rank}/{env_world.size} from SLURM variables, without MPI "
            f"(use {env.mpi_hint} for a coordinated job)",
            file=sys.stderr,
        )
    return found or env_world
