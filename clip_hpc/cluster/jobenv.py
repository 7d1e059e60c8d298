"""The job environment, read once: what SLURM, an MPI launcher, torchrun, OpenMP and the kernel say about this process.

One typed record instead of `os.environ` lookups spread over the package, so "how many CPUs", "which rank" and
"which node" get the same answer in embed, index and serve. `JobEnv.from_mapping` is pure (tests build one from a
dict); `job_env()` is the edge that reads this process's once; `use_threads` is for entry points only.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

# variables an MPI launcher (Hydra/MPICH, PMI/PMIx, Open MPI, HPE PALS) sets in the processes it starts; srun's
# cray_shasta plugin (Perlmutter's default) sets PALS_RANKID and PALS_LOCAL_RANKID, not PMI_RANK
MPI_HINTS = (
    "PMI_RANK",
    "PALS_RANKID",
    "PALS_LOCAL_RANKID",
    "PMI_SIZE",
    "PMI_FD",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "HYDRA_CONTROL_FD",
    "MPICH_INTERFACE_HOSTNAME",
)
DEFAULT_SRUN_MPI = "pmi2"  # the srun plugin of the pip MPICH wheel (hpc/generic.sh); profiles set their own
DEFAULT_WORKERS = 2  # DataLoader workers per rank when SLURM does not say how many CPUs a task has


class Place(NamedTuple):
    """A rank's place in the job as a launcher's variables state it (the fallback when MPI is not up)."""

    backend: str
    rank: int
    size: int
    local_rank: int
    local_size: int


class LaunchVars(NamedTuple):
    """One launcher's rank, size, local rank and local size, as set (None where missing or not a number)."""

    rank: int | None = None
    size: int | None = None
    local_rank: int | None = None
    local_size: int | None = None

    def place(self, backend: str) -> Place | None:
        """The place these variables give, or None when they are missing or inconsistent (rank outside size)."""
        if self.rank is None or self.size is None or self.size < 1 or not 0 <= self.rank < self.size:
            return None
        local = self.local_rank or 0
        return Place(backend, self.rank, self.size, local, max(self.local_size or 1, local + 1))


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def _count(environ: Mapping[str, str], name: str) -> int | None:
    """A positive count, else None: an empty, zero or junk value means 'not said'."""
    value = _int(environ, name)
    return value if value is not None and value > 0 else None


def _launch_vars(environ: Mapping[str, str], *names: str) -> LaunchVars:
    return LaunchVars(*(_int(environ, name) for name in names))


def _omp_threads(environ: Mapping[str, str]) -> int | None:
    """OMP_NUM_THREADS as a count; the nested form "4,2" gives a thread count per nesting level, and the outer
    one (the first) is what this process runs."""
    first = environ.get("OMP_NUM_THREADS", "").split(",")[0]
    return _count({"OMP_NUM_THREADS": first}, "OMP_NUM_THREADS")


_TASKS_PART = re.compile(r"\s*(\d+)(?:\(x(\d+)\))?\s*")


def tasks_on_node(spec: str, node: int) -> int | None:
    """SLURM's compressed per-node list (SLURM_STEP_TASKS_PER_NODE "4(x2),2": 4 tasks on nodes 0 and 1, 2 on node
    2) at index `node`; None when the list is junk or shorter."""
    for part in spec.split(","):
        match = _TASKS_PART.fullmatch(part)
        if match is None:
            return None
        repeat = int(match[2] or 1)
        if node < repeat:
            return int(match[1])
        node -= repeat
    return None


def _slurm_vars(environ: Mapping[str, str]) -> LaunchVars:
    """This task's place in its SLURM job step (srun). The batch script itself is no task of a step: SLURM gives it
    SLURM_PROCID=0 and the job's SLURM_NTASKS but no SLURM_STEP_ID (seen on SLURM 22.05), so a program started there
    without srun is one process, not rank 0 of N that leaves the other ranks' units undone. The local size is the
    step's count on this node (SLURM_STEP_TASKS_PER_NODE at SLURM_NODEID): SLURM_NTASKS_PER_NODE is set only for
    --ntasks-per-node, and then as the job's request, not the step's."""
    if environ.get("SLURM_JOB_ID") and not (environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID")):
        return LaunchVars()
    node = _int(environ, "SLURM_NODEID")
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    local_size = tasks_on_node(per_node, node) if per_node and node is not None and node >= 0 else None
    return LaunchVars(
        _int(environ, "SLURM_PROCID"),
        _count(environ, "SLURM_STEP_NUM_TASKS") or _int(environ, "SLURM_NTASKS"),
        _int(environ, "SLURM_LOCALID"),
        local_size or _int(environ, "SLURM_NTASKS_PER_NODE"),
    )


@dataclass(frozen=True)
class JobEnv:
    """What the job's launcher and the kernel told this process; derived answers are properties."""

    slurm_job_id: str | None = None
    slurm_step_id: str | None = None
    slurm: LaunchVars = LaunchVars()  # SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, tasks on this node (_slurm_vars)
    slurm_cpus_per_task: int | None = None
    torchrun: LaunchVars = LaunchVars()  # RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
    mpi_hints: frozenset[str] = frozenset()  # which of MPI_HINTS are set
    force_mpi: bool = False  # CLIP_HPC_FORCE_MPI: try MPI even without launcher variables
    srun_mpi: str = DEFAULT_SRUN_MPI  # CLIP_HPC_SRUN_MPI from the cluster profile: the srun --mpi= that works there
    omp_num_threads: int | None = None
    affinity: frozenset[int] | None = None  # the CPUs the kernel schedules this process on
    cpu_count: int | None = None  # the node's
    nodename: str = ""  # SLURMD_NODENAME, else the kernel's host name

    @classmethod
    def from_mapping(
        cls,
        environ: Mapping[str, str],
        affinity: set[int] | frozenset[int] | None = None,
        cpu_count: int | None = None,
        hostname: str = "",
    ) -> JobEnv:
        """Pure: the environment as a mapping plus what the kernel said, so tests need no real job."""
        return cls(
            slurm_job_id=environ.get("SLURM_JOB_ID") or None,
            slurm_step_id=environ.get("SLURM_STEP_ID") or None,
            slurm=_slurm_vars(environ),
            slurm_cpus_per_task=_count(environ, "SLURM_CPUS_PER_TASK"),
            torchrun=_launch_vars(environ, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
            mpi_hints=frozenset(name for name in MPI_HINTS if name in environ),
            force_mpi=bool(environ.get("CLIP_HPC_FORCE_MPI")),
            srun_mpi=environ.get("CLIP_HPC_SRUN_MPI") or DEFAULT_SRUN_MPI,
            omp_num_threads=_omp_threads(environ),
            affinity=frozenset(affinity) if affinity else None,
            cpu_count=cpu_count,
            nodename=environ.get("SLURMD_NODENAME") or hostname,
        )

    @property
    def mpi_launched(self) -> bool:
        """Whether an MPI launcher started us (then MPI is worth its start-up cost)."""
        return bool(self.mpi_hints)

    @property
    def mpi_hint(self) -> str:
        """How to start this job's ranks as one MPI world on this cluster (the profile's srun plugin)."""
        return f"srun --mpi={self.srun_mpi} (or mpiexec)"

    @property
    def launcher_place(self) -> Place | None:
        """This rank's place from torchrun's variables, else SLURM's, else None (a lone process). torchrun's come
        first because torchrun runs under srun, never the other way round: in `srun -N 2 torchrun --nproc_per_node=4`
        every worker also inherits its srun task's SLURM_PROCID, and by SLURM's variables all 4 would be one rank."""
        return self.torchrun.place("torchrun") or self.slurm.place("slurm")

    @property
    def available_cpus(self) -> int:
        """The CPUs the kernel will run us on: the affinity mask (cgroup, srun or mpiexec binding), else the node's."""
        return len(self.affinity) if self.affinity else (self.cpu_count or 1)

    @property
    def cpus(self) -> int:
        """The CPUs this process may use: an explicit OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, each capped by the
        affinity mask (what the kernel will actually schedule us on), else the mask itself, else the node's count."""
        stated = self.omp_num_threads or self.slurm_cpus_per_task
        return min(stated, self.available_cpus) if stated else self.available_cpus

    def threads_per_rank(self, local_size: int) -> int:
        """torch threads for one of `local_size` ranks on this node: a count stated per task (OMP_NUM_THREADS,
        SLURM_CPUS_PER_TASK) is this rank's already; a mask or node count the ranks share is split between them."""
        if self.omp_num_threads or self.slurm_cpus_per_task:
            return self.cpus
        return max(1, self.cpus // max(1, local_size))

    @property
    def dataloader_workers(self) -> int:
        """Decoding workers per rank: all but one of the task's CPUs (the main process feeds the model), capped by
        the mask; without SLURM_CPUS_PER_TASK the CPUs may be shared with other ranks, so a small fixed number, but
        never more than the mask's CPUs beside the main process (srun without -c binds a task to one CPU)."""
        if self.slurm_cpus_per_task is None:
            return min(DEFAULT_WORKERS, max(0, self.available_cpus - 1))
        return max(0, min(self.slurm_cpus_per_task, self.available_cpus) - 1)


@functools.cache
def job_env() -> JobEnv:
    """This process's job environment, read once: read early, before an OpenMP runtime may pin the main thread."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return JobEnv.from_mapping(os.environ, affinity, os.cpu_count(), os.uname().nodename)


def use_threads(torch_threads: int | None = None, faiss_threads: int | None = None) -> None:
    """Size torch's and/or FAISS's thread pools (None: leave that one, and do not import it). This changes the
    whole process, so only entry points (the CLI commands, the server's compute thread) call it, never library code."""
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    if faiss_threads is not None:
        import faiss

        faiss.omp_set_num_threads(faiss_threads)
