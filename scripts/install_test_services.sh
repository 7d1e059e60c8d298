#!/usr/bin/env bash
# Install the system services the integration tests drive for real: SLURM (slurmctld, slurmd, munge),
# OpenSSH (server and client) and headless Chromium. Idempotent: does nothing when all are present.
#
# The Debian packages would normally start their own daemons; the tests start and stop their own instances
# (scripts/slurm-local.sh, scripts/sshd-local.sh), so a policy-rc.d that refuses every start is put in place for
# the duration of the install and any daemon that still came up is stopped by its pid file.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client chromium iproute2)
export DEBIAN_FRONTEND=noninteractive

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_test_services: all present (${PACKAGES[*]})"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install_test_services: run as root (or install sudo)" >&2; exit 1; }
    SUDO=(sudo DEBIAN_FRONTEND=noninteractive)
fi

echo "install_test_services: installing ${missing[*]}"
POLICY=/usr/sbin/policy-rc.d
policy_was_ours=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# clip-hpc install_test_services: no daemon starts during install\nexit 101\n' \
        | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    policy_was_ours=1
fi
remove_policy() { if [ "$policy_was_ours" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap remove_policy EXIT

"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# Belt and braces: without systemd, policy-rc.d is the only guard; stop anything that slipped through by its pid.
for pidfile in /run/sshd.pid /run/munge/munged.pid /run/slurmctld.pid /run/slurmd.pid; do
    if [ -s "$pidfile" ]; then
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            echo "install_test_services: stopping system daemon started by the install (pid $pid, $pidfile)"
            "${SUDO[@]}" kill "$pid" || true
        fi
    fi
done
echo "install_test_services: done"
