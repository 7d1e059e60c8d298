# clip-hpc cluster profile: generic (the default). Any SLURM cluster, the package installed in a venv.
# Sourced (bash) by slurm/*.sbatch inside the job and by slurm/pipeline.sh on the login node, with CLIP_HPC_HOME
# set to the checkout. A profile only sets variables, so sourcing it twice is harmless. What a profile may set:
#   CLIP_HPC_VENV            the venv to put first on PATH (default: $CLIP_HPC_HOME/.venv)
#   CLIP_HPC_SRUN_MPI        srun --mpi=... for the embed ranks (pmi2 for the pip MPICH that mpi4py uses)
#   CLIP_HPC_GPUS_PER_NODE   GPUs per node; the embed job runs one task per GPU
#   CLIP_HPC_EMBED_SBATCH, CLIP_HPC_INDEX_SBATCH, CLIP_HPC_SERVE_SBATCH  (--ntasks in the index options = index ranks)
#                            default sbatch options that slurm/pipeline.sh gives each job
#   CLIP_HPC_DATA            where slurm/pipeline.sh puts EMB_DIR and INDEX_DIR when given a relative work dir
#   CLIP_HPC_LOGIN_HOST      the [user@]host[:port] a laptop ssh-es to; printed in the serve job's tunnel command,
#                            whose every hop gets this user
#   CLIP_HPC_SSH_KEY         the laptop's key for every hop of that command (ssh -i; Perlmutter: ~/.ssh/nersc)
#   CLIP_HPC_WEIGHTS         the weights cache of fetch-model and of the jobs (default: open_clip's, HF_HOME)
#   CLIP_HPC_SRUN_MPI is also the --mpi= that clip-hpc's hints name when ranks start without MPI
#   SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_CONSTRAINT, SBATCH_PARTITION ...  read by sbatch itself
: "${CLIP_HPC_VENV:=$CLIP_HPC_HOME/.venv}"
if [ -x "$CLIP_HPC_VENV/bin/python" ]; then
    export VIRTUAL_ENV=$CLIP_HPC_VENV
    case ":$PATH:" in *":$CLIP_HPC_VENV/bin:"*) ;; *) export PATH="$CLIP_HPC_VENV/bin:$PATH" ;; esac
fi
: "${CLIP_HPC_SRUN_MPI:=pmi2}"
: "${CLIP_HPC_GPUS_PER_NODE:=0}"
: "${CLIP_HPC_EMBED_SBATCH:=}"
: "${CLIP_HPC_INDEX_SBATCH:=}"
: "${CLIP_HPC_SERVE_SBATCH:=}"
: "${CLIP_HPC_DATA:=$PWD}"
: "${CLIP_HPC_LOGIN_HOST:=$(id -un)@${SLURM_SUBMIT_HOST:-$(hostname -f 2>/dev/null || hostname)}}"
export CLIP_HPC_VENV CLIP_HPC_SRUN_MPI CLIP_HPC_GPUS_PER_NODE CLIP_HPC_DATA CLIP_HPC_LOGIN_HOST
if [ -n "${CLIP_HPC_WEIGHTS:-}" ]; then export CLIP_HPC_WEIGHTS; fi
if [ -n "${CLIP_HPC_SSH_KEY:-}" ]; then export CLIP_HPC_SSH_KEY; fi
