#!/usr/bin/env bash
# slurm-down.sh - undo slurm-up.sh: cancel every job, then stop slurmd, slurmctld and
# munged by the pids slurm-up.sh recorded (each checked to still be that program).
set -uo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/slurm
[ "$(id -u)" = 0 ] || { echo "slurm-down.sh: needs root" >&2; exit 1; }
say() { printf '[slurm-down] %s\n' "$*"; }
live() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && [ -d "/proc/$pid" ] || return 1
  [ "$(readlink -f "/proc/$pid/exe")" = "$(readlink -f "$2")" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ] || return 1
  echo "$pid"
}
stop() {
  local pid
  if pid=$(live "$STATE/$1.pid" "/usr/sbin/$1"); then
    kill -TERM "$pid"
    for _ in $(seq 1 150); do live "$STATE/$1.pid" "/usr/sbin/$1" >/dev/null || break; sleep 0.1; done
    live "$STATE/$1.pid" "/usr/sbin/$1" >/dev/null && kill -KILL "$pid"
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$STATE/$1.pid"
}
if live "$STATE/slurmctld.pid" /usr/sbin/slurmctld >/dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi
stop slurmd
stop slurmctld
stop munged
