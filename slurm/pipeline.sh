#!/usr/bin/env bash
# Submit the whole pipeline: embed, then index once the embed succeeded, then (with --serve) the server.
# Usage: slurm/pipeline.sh [--serve] [--sbatch "OPTS"] [--index-args "ARGS"] [--serve-args "ARGS"] \
#                     WORK_DIR INPUT... [-- EMBED_OPTIONS...]
# Writes WORK_DIR/emb (shards), WORK_DIR/index and WORK_DIR/logs (job logs); a relative WORK_DIR lies under
# the profile's CLIP_HPC_DATA (generic: the current directory; perlmutter: $SCRATCH/clip-hpc).
# Each job also gets the profile's default sbatch options (CLIP_HPC_EMBED_SBATCH, ...); --sbatch adds to all three.
# Prints one line per job, "embed=JOBID" etc., for scripts to read.
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

serve=0 extra_sbatch="" index_args="" serve_args=""
while [ $# -gt 0 ]; do
    case "$1" in
        --serve) serve=1; shift ;;
        --sbatch) extra_sbatch=${2?--sbatch needs a value}; shift 2 ;;
        --index-args) index_args=${2?--index-args needs a value}; shift 2 ;;
        --serve-args) serve_args=${2?--serve-args needs a value}; shift 2 ;;
        -h|--help) usage ;;
        --) break ;;
        -*) echo "pipeline.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || usage
work=$1; shift
inputs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do inputs+=("$1"); shift; done
[ "${1:-}" != "--" ] || shift
embed_opts=("$@")
[ ${#inputs[@]} -gt 0 ] || { echo "pipeline.sh: give at least one INPUT" >&2; usage; }

CLIP_HPC_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLIP_HPC_STAGE=pipeline
# shellcheck source=common.sh
source "$CLIP_HPC_HOME/slurm/common.sh"
command -v sbatch >/dev/null || clip_hpc_die "sbatch not found: run this on the cluster's login node"

case "$work" in /*) ;; *) work=$CLIP_HPC_DATA/$work ;; esac
mkdir -p "$work/logs"
emb=$work/emb index=$work/index

submit() {  # submit NAME PROFILE_OPTS SCRIPT ARGS...: prints the job id
    local name=$1 profile_opts=$2 script=$3; shift 3
    # shellcheck disable=SC2086  # option strings are meant to be split into words
    sbatch --parsable --job-name="clip-$name" --output="$work/logs/clip-$name-%j.out" $profile_opts $extra_sbatch \
        ${dependency:+--dependency=afterok:$dependency} "$CLIP_HPC_HOME/slurm/$script" "$@" | cut -d';' -f1
}

dependency=""
embed_job=$(submit embed "$CLIP_HPC_EMBED_SBATCH" embed.sbatch "${inputs[@]}" --out "$emb" "${embed_opts[@]}")
echo "embed=$embed_job"
dependency=$embed_job
# shellcheck disable=SC2086
index_job=$(submit index "$CLIP_HPC_INDEX_SBATCH" index.sbatch "$emb" --out "$index" $index_args)
echo "index=$index_job"
if [ "$serve" = 1 ]; then
    dependency=$index_job
    conn=${CLIP_HPC_CONNECTION_FILE:-$HOME/.clip-hpc/connections/clip-serve-$(basename "$work").json}
    # shellcheck disable=SC2086
    serve_job=$(umask 077; export CLIP_HPC_CONNECTION_FILE=$conn
        submit serve "$CLIP_HPC_SERVE_SBATCH" serve.sbatch "$index" $serve_args)
    echo "serve=$serve_job"
    echo "connection_file=$conn"
fi
echo "pipeline.sh: logs in $work/logs; watch with: squeue -u $(id -un)" >&2
[ "$serve" = 0 ] || echo "pipeline.sh: once the serve job runs, its log prints the ssh tunnel command" >&2
