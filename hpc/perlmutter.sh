# clip-hpc cluster profile: NERSC Perlmutter (GPU nodes: 4x A100, 64 cores / 128 hardware threads each).
# Written from NERSC's documented conventions; not run on Perlmutter by the clip-hpc tests (they use local.sh).
#
# Before the first job (once, on a login node):
#   module load PrgEnv-gnu cudatoolkit python
#   python -m venv $CLIP_HPC_HOME/.venv && source $CLIP_HPC_HOME/.venv/bin/activate
#   pip install -e $CLIP_HPC_HOME
#   MPICC="cc -shared" pip install --force-reinstall --no-cache-dir --no-binary=mpi4py mpi4py  # on Cray MPICH
#   clip-hpc fetch-model ViT-B-32 laion2b_s34b_b79k          # compute nodes may not reach the internet
# and set your project: export CLIP_HPC_ACCOUNT=m1234 (or SBATCH_ACCOUNT).
if command -v module >/dev/null 2>&1; then
    module load PrgEnv-gnu cudatoolkit python >/dev/null 2>&1 || echo "perlmutter profile: module load failed" >&2
fi
: "${SBATCH_ACCOUNT:=${CLIP_HPC_ACCOUNT:-}}"
[ -n "$SBATCH_ACCOUNT" ] || unset SBATCH_ACCOUNT   # an empty account is an error to sbatch; the default is used
: "${SBATCH_CONSTRAINT:=gpu}"
: "${SBATCH_QOS:=${CLIP_HPC_QOS:-regular}}"
export SBATCH_CONSTRAINT SBATCH_QOS ${SBATCH_ACCOUNT:+SBATCH_ACCOUNT}
: "${CLIP_HPC_GPUS_PER_NODE:=4}"
# mpi4py built on Cray MPICH starts under srun's default plugin; pmi2 is for the pip MPICH of the generic profile.
: "${CLIP_HPC_SRUN_MPI:=cray_shasta}"
# One task per GPU, a quarter of the node's hardware threads each (DataLoader workers = cpus-per-task - 1).
: "${CLIP_HPC_EMBED_SBATCH:=--ntasks-per-node=4 --gpus-per-task=1 --cpus-per-task=32 --time=02:00:00}"
# The index job: one task per GPU of a node (rank 0 trains on its GPU, every rank adds its shards); more nodes
# with -N. slurm/index.sbatch runs srun over all of the job's tasks.
: "${CLIP_HPC_INDEX_SBATCH:=--ntasks-per-node=4 --gpus-per-task=1 --cpus-per-task=32 --time=02:00:00}"
# The server needs no GPU: a shared CPU slot for a working day.
: "${CLIP_HPC_SERVE_SBATCH:=--constraint=cpu --qos=shared --cpus-per-task=8 --time=08:00:00}"
: "${CLIP_HPC_DATA:=${SCRATCH:-$HOME}/clip-hpc}"
: "${CLIP_HPC_LOGIN_HOST:=$(id -un)@perlmutter.nersc.gov}"
export HF_HOME=${HF_HOME:-${SCRATCH:-$HOME}/.cache/huggingface}   # model weights fetched on the login node
# In a job only: sbatch exports the login node's environment (pipeline.sh sources this there) into the job, where
# an OMP_NUM_THREADS=8 set on the login node would cap the threads of every -c 32 task.
if [ -n "${SLURM_JOB_ID:-}" ]; then
    export HF_HUB_OFFLINE=1   # jobs read the model cache, never the hub
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
fi
# shellcheck source=generic.sh
source "$CLIP_HPC_HOME/hpc/generic.sh"
