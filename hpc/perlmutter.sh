# clip-hpc cluster profile: NERSC Perlmutter (GPU nodes: 4x A100, 64 cores / 128 hardware threads each).
# Written from NERSC's documented conventions; not run on Perlmutter by the clip-hpc tests (they use local.sh).
#
# Before the first job (once, on a login node; README: Perlmutter has the NERSC page behind each step):
#   module load PrgEnv-gnu cudatoolkit python
#   python -m venv $CLIP_HPC_HOME/.venv && source $CLIP_HPC_HOME/.venv/bin/activate
#   pip install -e $CLIP_HPC_HOME          # no [mpi-wheel]: mpi4py is built on Cray MPICH, next line
#   MPICC="cc -shared" pip install --force-reinstall --no-cache-dir --no-binary=mpi4py mpi4py
#   clip-hpc fetch-model --profile perlmutter ViT-B-32 laion2b_s34b_b79k   # into $CLIP_HPC_WEIGHTS, where jobs look
# and set your project: export CLIP_HPC_ACCOUNT=m1234 (or SBATCH_ACCOUNT). Submit with `clip-hpc submit STAGE ...`
# (or slurm/pipeline.sh): a bare `sbatch slurm/embed.sbatch` gets none of the options below and stops at once.
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
# The NERSC GPU modules set MPICH_GPU_SUPPORT_ENABLED=1, and MPI_Init then aborts in an mpi4py built without the
# GTL library; clip-hpc's MPI messages are host (pickled) objects only.
export MPICH_GPU_SUPPORT_ENABLED=0
# One task per GPU, a quarter of the node's hardware threads each (DataLoader workers = cpus-per-task - 1). The 4
# GPUs go to the node, unbound (what NERSC's GPU examples use): each rank takes GPU local_rank (--gpus-per-task
# would bind one GPU per task and hide the others from CUDA peer access).
: "${CLIP_HPC_EMBED_SBATCH:=--ntasks-per-node=4 --gpus-per-node=4 --gpu-bind=none --cpus-per-task=32 --time=02:00:00}"
# The index job: one task per GPU of a node (rank 0 trains on its GPU, every rank adds its shards); more nodes
# with -N. slurm/index.sbatch runs srun over all of the job's tasks.
: "${CLIP_HPC_INDEX_SBATCH:=--ntasks-per-node=4 --gpus-per-node=4 --gpu-bind=none --cpus-per-task=32 --time=02:00:00}"
# The server needs no GPU: a shared CPU slot for a working day, with the memory for the index (the shared QOS
# gives ~2 GB per CPU otherwise); raise --mem for an index larger than ~20 GB.
: "${CLIP_HPC_SERVE_SBATCH:=--constraint=cpu --qos=shared --cpus-per-task=8 --mem=32G --time=08:00:00}"
: "${CLIP_HPC_DATA:=${SCRATCH:-$HOME}/clip-hpc}"   # embeddings and indexes: $SCRATCH is fast, and purged
: "${CLIP_HPC_LOGIN_HOST:=$(id -un)@perlmutter.nersc.gov}"
# The laptop's key for every ssh hop (sshproxy.sh writes ~/.ssh/nersc); empty: ssh's own keys. Kept unexpanded:
# it is the laptop's home, not this one.
CLIP_HPC_SSH_KEY=${CLIP_HPC_SSH_KEY-'~/.ssh/nersc'}
# Model weights: one cache for fetch-model on the login node and for the jobs, in $HOME (never purged; $SCRATCH
# is). A project can share one on CFS: CLIP_HPC_WEIGHTS=$CFS/m1234/clip-hpc-weights.
: "${CLIP_HPC_WEIGHTS:=$HOME/.cache/clip-hpc/weights}"
export CLIP_HPC_WEIGHTS CLIP_HPC_SSH_KEY
export HF_HOME=${HF_HOME:-$CLIP_HPC_WEIGHTS/huggingface}   # tokenizers and other hub files beside the weights
# In a job only: sbatch exports the login node's environment (pipeline.sh sources this there) into the job, where
# an OMP_NUM_THREADS=8 set on the login node would cap the threads of every -c 32 task.
if [ -n "${SLURM_JOB_ID:-}" ]; then
    export HF_HUB_OFFLINE=1   # jobs read the model cache, never the hub
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
fi
# shellcheck source=generic.sh
source "$CLIP_HPC_HOME/hpc/generic.sh"
