"""The job environment from mappings: what SLURM, an MPI launcher, OpenMP and the affinity mask say, and the
answers embed, index and serve derive from it (CPUs, threads, DataLoader workers, the rank fallbacks)."""

from clip_hpc.cluster.jobenv import DEFAULT_WORKERS, JobEnv, Place, job_env, tasks_on_node
from clip_hpc.cluster.world import World, world_from_env

EIGHT = set(range(8))


def test_nothing_set_is_a_lone_process_on_the_node():
    env = JobEnv.from_mapping({}, None, 64, "laptop")
    assert env.launcher_place is None and not env.mpi_launched and not env.force_mpi
    assert (env.cpus, env.threads_per_rank(1), env.threads_per_rank(4)) == (64, 64, 16)
    assert env.dataloader_workers == DEFAULT_WORKERS and env.nodename == "laptop"
    assert JobEnv.from_mapping({}, None, None).cpus == 1  # nothing known: one CPU, never zero


def test_slurm_only():
    env = JobEnv.from_mapping(
        {
            "SLURM_JOB_ID": "123",
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_CPUS_PER_TASK": "6",
            "SLURMD_NODENAME": "nid0042",
        },
        EIGHT,
        128,
        "nid0042.example",
    )
    assert (env.slurm_job_id, env.slurm_step_id, env.nodename) == ("123", "0", "nid0042")
    assert env.launcher_place == Place("slurm", 3, 8, 1, 4) and not env.mpi_launched
    assert env.cpus == 6 and env.threads_per_rank(4) == 6  # stated per task: not split again between the ranks
    assert env.dataloader_workers == 5
    capped = JobEnv.from_mapping({"SLURM_CPUS_PER_TASK": "16"}, EIGHT, 128)
    assert capped.cpus == 8 and capped.dataloader_workers == 7  # never more than the mask lets us run on
    assert JobEnv.from_mapping({"SLURM_CPUS_PER_TASK": "1"}, EIGHT, 8).dataloader_workers == 0
    assert JobEnv.from_mapping({"SLURM_PROCID": "5", "SLURM_NTASKS": "2"}).launcher_place is None  # inconsistent


def test_mpi_launcher_only():
    env = JobEnv.from_mapping({"PMI_RANK": "1", "PMI_SIZE": "2", "HYDRA_CONTROL_FD": "7"}, EIGHT, 8)
    assert env.mpi_launched and env.mpi_hints == {"PMI_RANK", "PMI_SIZE", "HYDRA_CONTROL_FD"}
    assert env.launcher_place is None  # MPI itself says who we are (cluster/world.py)
    assert env.threads_per_rank(2) == 4  # two ranks share one unbound mask: half each
    assert JobEnv.from_mapping({"OMPI_COMM_WORLD_SIZE": "4"}).mpi_launched
    assert JobEnv.from_mapping({"CLIP_HPC_FORCE_MPI": "1"}).force_mpi


def test_omp_num_threads_is_capped_by_the_affinity_mask():
    assert JobEnv.from_mapping({"OMP_NUM_THREADS": "2", "SLURM_CPUS_PER_TASK": "4"}, EIGHT, 64).cpus == 2
    assert JobEnv.from_mapping({"OMP_NUM_THREADS": "32"}, EIGHT, 64).cpus == 8
    assert JobEnv.from_mapping({"OMP_NUM_THREADS": "32"}, EIGHT, 64).threads_per_rank(4) == 8
    assert JobEnv.from_mapping({"OMP_NUM_THREADS": "0"}, EIGHT, 64).cpus == 8  # zero or junk: not said
    assert JobEnv.from_mapping({"OMP_NUM_THREADS": "junk"}, None, 64).cpus == 64


def test_torchrun_variables_and_the_world_fallback():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert JobEnv.from_mapping(env).launcher_place == Place("torchrun", 1, 2, 1, 2)
    assert world_from_env(env) == World(1, 2, 1, 2, "torchrun")


def test_this_process_is_read_once():
    assert job_env() is job_env() and job_env().cpus >= 1


def test_the_batch_script_is_one_process_not_rank_0_of_the_job():
    # what the batch step of `sbatch -n 4` really gets (SLURM 22.05): rank variables, but no step id
    batch = {
        "SLURM_JOB_ID": "1",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_NPROCS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": "4",
        "SLURM_CPUS_PER_TASK": "2",
    }
    assert JobEnv.from_mapping(batch).launcher_place is None and world_from_env(batch) == World()
    step = {
        **batch,
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "2",
        "SLURM_NTASKS": "3",
        "SLURM_STEP_NUM_TASKS": "3",
        "SLURM_STEP_TASKS_PER_NODE": "3",
        "SLURM_TASKS_PER_NODE": "3",
    }
    assert JobEnv.from_mapping(step).launcher_place == Place("slurm", 2, 3, 2, 3)


def test_slurm_local_size_is_the_steps_count_on_this_node():
    # srun without --ntasks-per-node sets no SLURM_NTASKS_PER_NODE: every local rank must still see the same size
    step = {
        "SLURM_JOB_ID": "9",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "10",
        "SLURM_STEP_NUM_TASKS": "10",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2),2",
        "SLURM_NTASKS_PER_NODE": "8",
    }
    sizes = {
        (node, local): JobEnv.from_mapping(
            {**step, "SLURM_NODEID": str(node), "SLURM_LOCALID": str(local), "SLURM_PROCID": str(4 * node + local)}
        ).launcher_place.local_size
        for node, local in ((0, 0), (0, 3), (1, 1), (2, 0), (2, 1))
    }
    assert sizes == {(0, 0): 4, (0, 3): 4, (1, 1): 4, (2, 0): 2, (2, 1): 2}
    rank0 = JobEnv.from_mapping(
        {**step, "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS_PER_NODE": ""}, EIGHT, 8
    )
    assert rank0.threads_per_rank(rank0.launcher_place.local_size) == 2  # a quarter of the node, not all of it
    assert tasks_on_node("2(x3)", 2) == 2 and tasks_on_node("2(x3)", 3) is None and tasks_on_node("x", 0) is None


def test_torchrun_under_srun_gives_each_worker_its_own_rank():
    # `srun -N 2 --ntasks-per-node=1 torchrun --nproc_per_node=4`: the workers inherit their srun task's variables
    srun_task = {
        "SLURM_JOB_ID": "5",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }
    worker = {**srun_task, "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    assert world_from_env(worker) == World(6, 8, 2, 4, "torchrun")
    assert world_from_env(srun_task) == World(1, 2, 0, 1, "slurm")


def test_nested_omp_num_threads_uses_the_outer_level():
    assert JobEnv.from_mapping({"OMP_NUM_THREADS": "4,2"}, EIGHT, 64).cpus == 4
    assert JobEnv.from_mapping({"OMP_NUM_THREADS": ""}, EIGHT, 64).cpus == 8
    assert JobEnv.from_mapping({"OMP_NUM_THREADS": "99999999999999999999"}, EIGHT, 64).cpus == 8


def test_default_workers_fit_the_mask_srun_binds_without_cpus_per_task():
    assert JobEnv.from_mapping({}, {3}, 64).dataloader_workers == 0  # one CPU: the main process decodes
    assert JobEnv.from_mapping({}, {3, 4}, 64).dataloader_workers == 1
    assert JobEnv.from_mapping({}, EIGHT, 64).dataloader_workers == DEFAULT_WORKERS


def test_cray_shasta_ranks_are_mpi_launched_and_the_hint_is_the_profiles_plugin():
    """srun's cray_shasta plugin (Perlmutter) sets PALS_RANKID, not PMI_RANK: without it MPI was never tried there."""
    pals = JobEnv.from_mapping({"PALS_RANKID": "3", "PALS_LOCAL_RANKID": "3", "CLIP_HPC_SRUN_MPI": "cray_shasta"})
    assert pals.mpi_launched and pals.mpi_hint.startswith("srun --mpi=cray_shasta")
    assert JobEnv.from_mapping({}).mpi_hint.startswith("srun --mpi=pmi2"), "the generic profile's plugin"


def test_an_idle_rank_without_mpi_is_told_to_exit_and_rank_0_is_not():
    """Ranks that cannot talk: rank 0 builds the index alone, the others exit 0 (a non-zero exit makes srun
    --kill-on-bad-exit take rank 0 down too)."""
    from clip_hpc.cluster.world import idle_without_mpi

    assert idle_without_mpi(World(0, 4, backend="slurm")) is None
    assert idle_without_mpi(World(0, 1)) is None
    message = idle_without_mpi(World(2, 4, backend="slurm"))
    assert message is not None and "rank 2 of 4" in message and "srun --mpi=" in message
    assert idle_without_mpi(World(2, 4, backend="mpi", comm=object())) is None
