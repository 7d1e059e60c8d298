# clip-hpc cluster profile: local, the throwaway single-node cluster of scripts/slurm-local.sh (tests, try-outs).
# Two CPU tasks of one CPU each for the embed, small jobs that can share the 8 advertised CPUs.
export SLURM_CONF=${SLURM_CONF:-${CLIP_HPC_SLURM_DIR:-/tmp/clip-hpc-slurm}/slurm.conf}
: "${CLIP_HPC_EMBED_SBATCH:=--ntasks=2 --cpus-per-task=1}"
: "${CLIP_HPC_INDEX_SBATCH:=--ntasks=1 --cpus-per-task=1}"   # --ntasks=N: N index ranks (srun in index.sbatch)
: "${CLIP_HPC_SERVE_SBATCH:=--cpus-per-task=1}"
: "${CLIP_HPC_LOGIN_HOST:=$(id -un)@127.0.0.1}"
# shellcheck source=generic.sh
source "$CLIP_HPC_HOME/hpc/generic.sh"
