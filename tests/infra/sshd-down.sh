#!/usr/bin/env bash
# sshd-down.sh - undo sshd-up.sh: stop the sshd pids it recorded (each checked to
# still be sshd), then whatever still runs inside its namespaces, then delete the
# namespaces and the bridge it created. Never kills by name. Idempotent.
set -uo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/sshd
[ "$(id -u)" = 0 ] || { echo "sshd-down.sh: needs root" >&2; exit 1; }
TAG=sshd-down
. "$(dirname "$(readlink -f "$0")")/common.sh"
[ -f "$STATE/created" ] || { say "nothing to stop"; exit 0; }
while read -r kind name; do
  [ "$kind" = netns ] || continue
  stop_recorded "sshd in $name" "$STATE/sshd-$name.pid" /usr/sbin/sshd 5
  if [ -e "/run/netns/$name" ]; then
    left=$(ip netns pids "$name" | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
      say "terminating processes left in $name: $left"
      # shellcheck disable=SC2086
      kill -TERM $left 2>/dev/null; sleep 1
      left=$(ip netns pids "$name" | tr '\n' ' ')
      # shellcheck disable=SC2086
      [ -n "${left// /}" ] && kill -KILL $left 2>/dev/null
    fi
    ip netns del "$name" && say "deleted netns $name"
  fi
done <"$STATE/created"
while read -r kind name; do
  [ "$kind" = bridge ] && ip link show "$name" >/dev/null 2>&1 && ip link del "$name" && say "deleted bridge $name"
done <"$STATE/created"
rm -f "$STATE/created"
