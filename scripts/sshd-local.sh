#!/usr/bin/env bash
# A throwaway sshd on loopback, with its own config, host key and client key: the "login node" for tunnel tests.
#
#   scripts/sshd-local.sh up        # start; prints SSHD_PORT=, SSHD_KEY=, SSHD_USER= lines
#   scripts/sshd-local.sh tunnel LOCAL_PORT REMOTE_PORT   # foreground ssh -N -L LOCAL:127.0.0.1:REMOTE
#   scripts/sshd-local.sh down      # stop it by its pid; safe to run twice
#
# Settings (environment): CLIP_HPC_SSHD_DIR (state dir, default /tmp/clip-hpc-sshd), CLIP_HPC_SSHD_PORT
# (default 12222). Only public-key logins for the current user, from loopback.
set -euo pipefail

STATE=${CLIP_HPC_SSHD_DIR:-/tmp/clip-hpc-sshd}
PORT=${CLIP_HPC_SSHD_PORT:-12222}
USER_NAME=$(id -un)
CONFIG=$STATE/sshd_config
CLIENT_KEY=$STATE/client_key
PIDFILE=$STATE/sshd.pid

log() { echo "sshd-local: $*" >&2; }
die() { log "error: $*"; exit 1; }
running() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

write_config() {
    cat >"$CONFIG" <<EOF
# Written by scripts/sshd-local.sh: loopback only, keys only, files in $STATE.
ListenAddress 127.0.0.1
Port $PORT
HostKey $STATE/host_key
PidFile $PIDFILE
AuthorizedKeysFile $STATE/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
AllowUsers $USER_NAME
X11Forwarding no
PrintMotd no
LogLevel INFO
EOF
}

up() {
    local sshd
    sshd=$(command -v sshd || echo /usr/sbin/sshd)
    [ -x "$sshd" ] || die "sshd not found: run scripts/install_test_services.sh"
    command -v ssh-keygen >/dev/null || die "ssh-keygen not found: run scripts/install_test_services.sh"
    if running; then
        log "already up (pid $(cat "$PIDFILE"))"
    else
        mkdir -p "$STATE" && chmod 0700 "$STATE"
        [ -s "$STATE/host_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$STATE/host_key"
        [ -s "$CLIENT_KEY" ] || ssh-keygen -q -t ed25519 -N "" -f "$CLIENT_KEY"
        cp "$CLIENT_KEY.pub" "$STATE/authorized_keys"
        write_config
        [ "$(id -u)" -ne 0 ] || mkdir -p /run/sshd   # privilege separation dir, needed when run as root
        # An absolute path and -E: sshd re-executes itself, and logs to a file instead of syslog.
        "$sshd" -f "$CONFIG" -E "$STATE/sshd.log" || die "sshd did not start; see $STATE/sshd.log"
        local deadline=$((SECONDS + 20))
        until running; do
            [ $SECONDS -lt $deadline ] || die "sshd wrote no pid file; see $STATE/sshd.log"
            sleep 0.2
        done
    fi
    echo "SSHD_PORT=$PORT"
    echo "SSHD_KEY=$CLIENT_KEY"
    echo "SSHD_USER=$USER_NAME"
}

tunnel() {
    [ $# -eq 2 ] || die "usage: $0 tunnel LOCAL_PORT REMOTE_PORT"
    exec ssh -N -L "$1:127.0.0.1:$2" -p "$PORT" -i "$CLIENT_KEY" -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ExitOnForwardFailure=yes -o LogLevel=ERROR \
        "$USER_NAME@127.0.0.1"
}

down() {
    if running; then
        local pid
        pid=$(cat "$PIDFILE")
        kill "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        log "stopped sshd (pid $pid)"
    fi
    rm -f "$PIDFILE"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    tunnel) shift; tunnel "$@" ;;
    *) echo "usage: $0 up|down|tunnel LOCAL_PORT REMOTE_PORT" >&2; exit 2 ;;
esac
