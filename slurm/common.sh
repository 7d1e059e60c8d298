# Shared by slurm/*.sbatch and slurm/pipeline.sh: find the checkout, source the cluster profile, check the CLI.
# sbatch runs a copy of the script from its spool dir, so the checkout comes from CLIP_HPC_HOME or the submit dir.
CLIP_HPC_HOME=$(cd "${CLIP_HPC_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)
export CLIP_HPC_HOME
CLIP_HPC_PROFILE=${CLIP_HPC_PROFILE:-generic}
export CLIP_HPC_PROFILE

clip_hpc_die() { echo "clip-hpc ${CLIP_HPC_STAGE:-job}: error: $*" >&2; exit 2; }

clip_hpc_profile_path() {
    case "$CLIP_HPC_PROFILE" in
        */*) echo "$CLIP_HPC_PROFILE" ;;                 # a path to a profile of your own
        *) echo "$CLIP_HPC_HOME/hpc/$CLIP_HPC_PROFILE.sh" ;;
    esac
}

clip_hpc_load_profile() {
    local profile
    profile=$(clip_hpc_profile_path)
    [ -f "$profile" ] || clip_hpc_die "no profile '$CLIP_HPC_PROFILE' ($profile); choose one of: $(
        cd "$CLIP_HPC_HOME/hpc" && ls ./*.sh | sed 's|^\./||; s|\.sh$||' | tr '\n' ' ')"
    set +u   # module systems and venv scripts read unset variables
    # shellcheck disable=SC1090
    source "$profile"
    set -u
    # What the scripts read under set -u; a profile gets them by ending with generic.sh (README: Adding a profile).
    local name missing=""
    for name in CLIP_HPC_VENV CLIP_HPC_SRUN_MPI CLIP_HPC_DATA CLIP_HPC_LOGIN_HOST CLIP_HPC_EMBED_SBATCH \
                CLIP_HPC_INDEX_SBATCH CLIP_HPC_SERVE_SBATCH; do
        [ -n "${!name+set}" ] || missing="$missing $name"
    done
    [ -z "$missing" ] || clip_hpc_die "profile '$CLIP_HPC_PROFILE' leaves unset:$missing;" \
        "end it with: source \"\$CLIP_HPC_HOME/hpc/generic.sh\""
    command -v clip-hpc >/dev/null || clip_hpc_die "clip-hpc is not on PATH after profile '$CLIP_HPC_PROFILE': " \
        "install it in $CLIP_HPC_VENV (python -m venv $CLIP_HPC_VENV && $CLIP_HPC_VENV/bin/pip install -e $CLIP_HPC_HOME)"
}

# One line a job log can be grepped for, also after a requeue (the log is appended to).
clip_hpc_banner() {
    echo "=== clip-hpc $CLIP_HPC_STAGE: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}" \
         "on ${SLURM_JOB_NODELIST:-$(hostname)}, ${SLURM_NTASKS:-1} task(s), profile $CLIP_HPC_PROFILE," \
         "$(date -Is)"
}

# A profile with GPUs (CLIP_HPC_GPUS_PER_NODE > 0) whose job got none stops here with one line: a hand-submitted
# `sbatch slurm/embed.sbatch` carries none of the profile's -C gpu / --gpus-per-node (they are options of
# `clip-hpc submit` and pipeline.sh), and its ranks would otherwise crawl on CPUs for the whole time limit.
clip_hpc_require_gpus() {
    [ "${CLIP_HPC_GPUS_PER_NODE:-0}" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ] || return 0
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}}
    [ -z "$gpus" ] || [ "$gpus" = 0 ] || return 0
    clip_hpc_die "profile '$CLIP_HPC_PROFILE' expects $CLIP_HPC_GPUS_PER_NODE GPU(s) per node and this job has" \
        "none: submit with 'clip-hpc submit $CLIP_HPC_STAGE ...' (it adds the profile's -C/-q/-A/--gpus-per-node)," \
        "or set CLIP_HPC_GPUS_PER_NODE=0 to run on CPUs"
}

clip_hpc_load_profile
