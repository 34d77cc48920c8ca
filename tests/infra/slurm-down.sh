#!/usr/bin/env bash
# slurm-down.sh - undo slurm-up.sh: cancel every job of its cluster, then stop slurmd,
# slurmctld and munged by the pids slurm-up.sh recorded (each checked to still be that
# program). State and configuration stay under $STATE for the next slurm-up.sh.
set -uo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/slurm
export SLURM_CONF=$STATE/slurm.conf
[ "$(id -u)" = 0 ] || { echo "slurm-down.sh: needs root" >&2; exit 1; }
TAG=slurm-down
. "$(dirname "$(readlink -f "$0")")/common.sh"
if live "$STATE/slurmctld.pid" /usr/sbin/slurmctld >/dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi
for d in slurmd slurmctld munged; do stop_recorded "$d" "$STATE/$d.pid" "/usr/sbin/$d"; done
