#!/usr/bin/env bash
# sge-down.sh - undo sge-up.sh: delete every job of its cell, then stop sge_execd and
# sge_qmaster by the pids sge-up.sh recorded (each checked to still be that program).
# The cell and its spool stay under $STATE for the next sge-up.sh.
set -uo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/sge
export SGE_ROOT=/var/lib/gridengine SGE_CELL=daskrs
export SGE_QMASTER_PORT=${DASK_RS_SGE_QMASTER_PORT:-6544} SGE_EXECD_PORT=${DASK_RS_SGE_EXECD_PORT:-6545}
[ "$(id -u)" = 0 ] || { echo "sge-down.sh: needs root" >&2; exit 1; }
TAG=sge-down
. "$(dirname "$(readlink -f "$0")")/common.sh"
if live "$STATE/qmaster.pid" /usr/lib/gridengine/sge_qmaster >/dev/null && [ -n "$(qstat -u '*' 2>/dev/null)" ]; then
  say "deleting the cell's jobs"
  qdel -u '*' >/dev/null 2>&1
  for _ in $(seq 1 150); do [ -z "$(qstat -u '*' 2>/dev/null)" ] && break; sleep 0.1; done
  [ -z "$(qstat -u '*' 2>/dev/null)" ] || qdel -f -u '*' >/dev/null 2>&1
fi
for d in execd qmaster; do
  stop_recorded "sge_$d" "$STATE/$d.pid" "/usr/lib/gridengine/sge_$d" 30
  rm -f "$STATE/run/$d.pid"
done
