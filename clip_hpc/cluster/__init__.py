"""Who and where this process is: the job environment (jobenv: SLURM, MPI, OMP, CPUs), the ranks' world (world), and
the one protocol by which a failure on any rank reaches every rank (collective)."""
