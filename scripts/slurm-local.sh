#!/usr/bin/env bash
# A throwaway single-node SLURM cluster (munged, slurmctld, slurmd) on loopback, for the tests and for trying the
# sbatch path on a workstation. No cgroups, no accounting database. Everything lives in one state dir.
#
#   scripts/slurm-local.sh up      # start (as root: slurmd must switch to the job's user); waits for the node
#   scripts/slurm-local.sh down    # stop each daemon by its pid; safe to run twice
#   scripts/slurm-local.sh status
#
# Settings (environment): CLIP_HPC_SLURM_DIR (state dir, default /tmp/clip-hpc-slurm), CLIP_HPC_SLURM_PORT
# (slurmctld port, default 16817; slurmd uses the next one), CLIP_HPC_SLURM_CPUS (CPUs the node advertises,
# default 8: more than the real cores, so that small jobs share the node).
set -euo pipefail

STATE=${CLIP_HPC_SLURM_DIR:-/tmp/clip-hpc-slurm}
CTLD_PORT=${CLIP_HPC_SLURM_PORT:-16817}
SLURMD_PORT=$((CTLD_PORT + 1))
NODE_CPUS=${CLIP_HPC_SLURM_CPUS:-8}
CONF=$STATE/slurm.conf
MUNGE_DIR=$STATE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
DAEMONS=(slurmd slurmctld munged)   # stop order; start order is the reverse

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }
pidfile() { echo "$STATE/$1.pid"; }
running() { local f; f=$(pidfile "$1"); [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS COMMAND...: poll COMMAND until it succeeds; fails after SECONDS
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
}

write_conf() {
    local mem_mb
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)   # advertise half the RAM
    cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: a single-node test cluster on loopback.
ClusterName=cliphpc
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may start again after 5 s instead of the default 120 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A default memory per CPU, so that a job does not claim the whole node and jobs can share it.
DefMemPerCPU=256
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmdTimeout=60
SchedulerParameters=sched_interval=2
# Features are labels only (no GPUs behind "gpu"): jobs of a Perlmutter-like profile (-C gpu, -C cpu) are placed.
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$mem_mb Features=cpu,gpu State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munged() {
    install -d -m 0700 -o munge -g munge "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_DIR/munge.key" status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0600 "$MUNGE_DIR/munge.key"
    touch "$(pidfile munged)" && chown munge:munge "$(pidfile munged)"
    # munged refuses to run as root; it runs as the munge user. --force: the state dir may sit under a
    # world-writable /tmp (sticky bit), which munged would otherwise reject.
    runuser -u munge -- munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$(pidfile munged)" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_for 20 test -S "$MUNGE_SOCKET" || die "munged did not start; see $MUNGE_DIR/munged.log"
    chmod 0755 "$MUNGE_DIR"   # clients (sbatch as any user) must reach the socket
}

up() {
    [ "$(id -u)" -eq 0 ] || die "run as root (slurmd starts jobs as their user; munged runs as the munge user)"
    for bin in munged slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || die "$bin not found: run scripts/install_test_services.sh"
    done
    if running slurmctld && running slurmd && running munged; then
        log "already up in $STATE"
    else
        down quiet
        mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
        chmod 0755 "$STATE" "$STATE/log"
        write_conf
        export SLURM_CONF=$CONF
        start_munged
        slurmctld -c -f "$CONF"          # -c: start from a clean state (no jobs from a previous cluster)
        slurmd -N localhost -f "$CONF"
        wait_for 30 running slurmctld || die "slurmctld did not start; see $STATE/log/slurmctld.log"
        wait_for 30 running slurmd || die "slurmd did not start; see $STATE/log/slurmd.log"
    fi
    export SLURM_CONF=$CONF
    node_idle() { [ "$(sinfo -h -N -n localhost -o %t 2>/dev/null)" = "idle" ]; }
    wait_for 60 node_idle || { sinfo -N -l >&2 || true; die "node never became idle; see $STATE/log/"; }
    log "up: node localhost idle, $NODE_CPUS CPUs, state in $STATE"
    echo "export SLURM_CONF=$CONF"
}

down() {
    local name pid f
    for name in "${DAEMONS[@]}"; do
        f=$(pidfile "$name")
        [ -s "$f" ] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
            [ "${1:-}" = quiet ] || log "stopped $name (pid $pid)"
        fi
        rm -f "$f"
    done
    [ "${1:-}" = quiet ] || log "down ($STATE)"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if running "$name"; then echo "$name: running (pid $(cat "$(pidfile "$name")"))"; else echo "$name: stopped"; fi
    done
    if running slurmctld; then SLURM_CONF=$CONF sinfo -N; fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
