"""Who and where this process is: the job environment (SLURM, MPI, OMP, CPUs) and the ranks' world."""
