"""Thread counts for serving from the CPUs this job was given, not the node's: torch and FAISS (OpenMP) default to
every core of the node, and on a shared node a 4-CPU job running 64 threads mostly waits on itself. The CPU count
itself is the job environment's (cluster/jobenv.py), the same one embed and index use."""

from __future__ import annotations

from collections.abc import Mapping

from clip_hpc.cluster.jobenv import JobEnv, job_env, use_threads


def job_cpus(environ: Mapping[str, str], affinity: set[int] | None, cpu_count: int | None) -> int:
    """The CPUs a process with this environment, affinity mask and node may use (`JobEnv.cpus`)."""
    return JobEnv.from_mapping(environ, affinity, cpu_count).cpus


def this_job_cpus() -> int:
    return job_env().cpus


def serving_threads(cpus: int, encoder_on_gpu: bool) -> tuple[int, int]:
    """(torch, FAISS) threads. With the model on the CPU, FAISS gets one: torch and FAISS each bring their own
    OpenMP pool, and FAISS's threads spinning after a search steal the cores torch's next batch needs, while a
    micro-batch's search (a few queries, a few lists each) gains little from more threads."""
    return cpus, (cpus if encoder_on_gpu else 1)


def use_job_cpus(encoder_on_gpu: bool = False) -> tuple[int, int]:
    """Set torch's and FAISS's thread counts from this job's CPUs; returns them. For the server's compute thread:
    it changes the process's pools."""
    torch_threads, faiss_threads = serving_threads(this_job_cpus(), encoder_on_gpu)
    use_threads(torch_threads, faiss_threads)
    return torch_threads, faiss_threads
