#!/usr/bin/env bash
# Remove this user's MPICH shared-memory segments that no process maps any more.
# A killed MPI job (pre-emption, `scontrol requeue`) leaves /dev/shm/mpich_shm_*; the requeued job gets the same
# job and step ids, MPICH derives the same segment name from them, and MPI_Init then fails on the stale data.
# Run once per node before the MPI step of a restarted job (embed.sbatch does).
set -euo pipefail
shopt -s nullglob
me=$(id -u)
for seg in /dev/shm/mpich_shm_*; do
    [ "$(stat -c %u "$seg")" = "$me" ] || continue
    if ! grep -qsF "$seg" /proc/[0-9]*/maps; then
        rm -f "$seg" && echo "clip-hpc: removed stale MPI segment $seg on $(hostname)"
    fi
done
