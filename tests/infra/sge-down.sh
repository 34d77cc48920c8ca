#!/usr/bin/env bash
# sge-down.sh - undo sge-up.sh: delete every job of the test cell, then stop sge_execd
# and sge_qmaster by the pids sge-up.sh recorded (each checked to still be that program).
set -uo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/sge
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
[ "$(id -u)" = 0 ] || { echo "sge-down.sh: needs root" >&2; exit 1; }
say() { printf '[sge-down] %s\n' "$*"; }
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
  if pid=$(live "$STATE/$1.pid" "/usr/lib/gridengine/sge_$1"); then
    kill -TERM "$pid"
    for _ in $(seq 1 300); do live "$STATE/$1.pid" "/usr/lib/gridengine/sge_$1" >/dev/null || break; sleep 0.1; done
    live "$STATE/$1.pid" "/usr/lib/gridengine/sge_$1" >/dev/null && kill -KILL "$pid"
    say "stopped sge_$1 (pid $pid)"
  fi
  rm -f "$STATE/$1.pid" "/run/gridengine/$1.pid"
}
if live "$STATE/qmaster.pid" /usr/lib/gridengine/sge_qmaster >/dev/null && [ -n "$(qstat -u '*' 2>/dev/null)" ]; then
  say "deleting the cell's jobs"
  qdel -u '*' >/dev/null 2>&1
  for _ in $(seq 1 150); do [ -z "$(qstat -u '*' 2>/dev/null)" ] && break; sleep 0.1; done
  [ -z "$(qstat -u '*' 2>/dev/null)" ] || qdel -f -u '*' >/dev/null 2>&1
fi
stop execd
stop qmaster
