"""Thread counts for serving from the CPUs this job was given, not the node's: torch and FAISS (OpenMP) default to
every core of the node, and on a shared node a 4-CPU job running 64 threads mostly waits on itself."""
from __future__ import annotations

import os
from typing import Mapping


def job_cpus(environ: Mapping[str, str], affinity: set[int] | None, cpu_count: int | None) -> int:
    """The CPUs this process may use: an explicit OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, each capped by the
    affinity mask (what the kernel will actually schedule us on), else the mask itself, else the node's count."""
    available = len(affinity) if affinity else (cpu_count or 1)
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), available)
    return available


def this_job_cpus() -> int:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return job_cpus(os.environ, affinity, os.cpu_count())


def serving_threads(cpus: int, encoder_on_gpu: bool) -> tuple[int, int]:
    """(torch, FAISS) threads. With the model on the CPU, FAISS gets one: torch and FAISS each bring their own
    OpenMP pool, and FAISS's threads spinning after a search steal the cores torch's next batch needs, while a
    micro-batch's search (a few queries, a few lists each) gains little from more threads."""
    return cpus, (cpus if encoder_on_gpu else 1)


def use_job_cpus(encoder_on_gpu: bool = False) -> tuple[int, int]:
    """Set torch's and FAISS's thread counts from this job's CPUs; returns them."""
    import faiss
    import torch

    torch_threads, faiss_threads = serving_threads(this_job_cpus(), encoder_on_gpu)
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)
    return torch_threads, faiss_threads
