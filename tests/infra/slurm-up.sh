#!/usr/bin/env bash
# slurm-up.sh - a one-node SLURM (munged, slurmctld, slurmd) on this machine for the
# slurm backend's tests. Installs Debian's slurm-wlm and munge if missing.
#
# Everything it creates lives under $STATE: its own slurm.conf (use it with
# SLURM_CONF=$STATE/slurm.conf, written to $STATE/env), its own munge key and socket,
# state, spool, pid and log files, cluster name "daskrs" and its own ports
# ($DASK_RS_SLURMCTLD_PORT, default 6917; $DASK_RS_SLURMD_PORT, default 6918). It never
# reads or changes /etc/slurm, /etc/munge, /var/spool/slurm* or /run, so another SLURM
# configured on this machine, running or stale, is neither used nor disturbed.
#
# Idempotent, and safe after a run that was killed halfway: a recorded daemon that no
# longer answers, or answers for another configuration, is stopped by its recorded pid
# and started again; state saved under another cluster name is discarded (it is ours).
# When a port it needs is held by a process it did not start, it stops at once and
# names that process. Stop with slurm-down.sh, which kills only the recorded pids.
# Needs root.
set -euo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/slurm
CPUS=${SLURM_CPUS:-8}
CTLD_PORT=${DASK_RS_SLURMCTLD_PORT:-6917}
SLURMD_PORT=${DASK_RS_SLURMD_PORT:-6918}
CLUSTER=daskrs
PKGS=(slurm-wlm slurmctld slurmd slurm-client munge)

[ "$(id -u)" = 0 ] || { echo "slurm-up.sh: needs root" >&2; exit 1; }
TAG=slurm-up
. "$(dirname "$(readlink -f "$0")")/common.sh"

install_missing "${PKGS[@]}"
install -d -m 755 "$(dirname "$STATE")" "$STATE"
CONF=$STATE/slurm.conf
MUNGE=$STATE/munge
SOCK=$MUNGE/munge.socket
export SLURM_CONF=$CONF

H=$(hostname -s)
install -d -o munge -g munge -m 755 "$MUNGE"
install -d -o slurm -g slurm -m 755 "$STATE/ctld" "$STATE/log" "$STATE/run"
install -d -m 755 "$STATE/d"
if [ ! -s "$MUNGE/munge.key" ]; then
  (umask 077; dd if=/dev/urandom bs=1024 count=1 of="$MUNGE/munge.key.tmp" 2>/dev/null)
  chown munge:munge "$MUNGE/munge.key.tmp"; mv "$MUNGE/munge.key.tmp" "$MUNGE/munge.key"
fi
MEM=$(awk '/MemTotal/ {m = int($2 / 1024); print (m < 8192 ? m : 8192)}' /proc/meminfo)
cat >"$CONF.tmp" <<CFG
# One node on loopback for dask-rs tests (tests/infra/slurm-up.sh).
ClusterName=$CLUSTER
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Advertise more CPUs than the machine has, so that several one-CPU jobs run at once.
SlurmdParameters=config_overrides
ReturnToService=2
CommunicationParameters=NoInAddrAny
MinJobAge=300
NodeName=$H NodeHostname=$H NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CFG
changed=0
cmp -s "$CONF.tmp" "$CONF" || { mv "$CONF.tmp" "$CONF"; changed=1; }
rm -f "$CONF.tmp"
printf 'SLURM_CONF=%s\n' "$CONF" >"$STATE/env"

munge_ok() { munge -S "$SOCK" -n </dev/null | unmunge -S "$SOCK"; }
if live "$STATE/munged.pid" /usr/sbin/munged >/dev/null && ! until_ok 2 munge_ok; then
  say "the recorded munged does not answer on $SOCK: restarting it"
  stop_recorded munged "$STATE/munged.pid" /usr/sbin/munged
fi
if ! live "$STATE/munged.pid" /usr/sbin/munged >/dev/null; then
  rm -f "$SOCK" "$SOCK.lock" "$MUNGE/munged.pid"
  setpriv --reuid=munge --regid=munge --init-groups -- /usr/sbin/munged --foreground --socket="$SOCK" \
    --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" \
    --seed-file="$MUNGE/munged.seed" >>"$STATE/munged.out" 2>&1 </dev/null &
  echo $! >"$STATE/munged.pid"
  until_ok 20 munge_ok || { echo "munged did not start:"; tail "$STATE/munged.out" "$MUNGE/munged.log"; exit 1; }
  say "munged pid $(cat "$STATE/munged.pid")"
fi

ctld_up() { [[ "$(scontrol ping 2>/dev/null)" == *"is UP"* ]]; }
if live "$STATE/slurmctld.pid" /usr/sbin/slurmctld >/dev/null && ! until_ok 3 ctld_up; then
  say "the recorded slurmctld does not answer on port $CTLD_PORT: restarting it"
  stop_recorded slurmctld "$STATE/slurmctld.pid" /usr/sbin/slurmctld
fi
if live "$STATE/slurmctld.pid" /usr/sbin/slurmctld >/dev/null; then
  [ $changed = 1 ] && scontrol reconfigure
else
  port_free "$CTLD_PORT" slurmctld "$STATE/slurmctld.pid" /usr/sbin/slurmctld "DASK_RS_SLURMCTLD_PORT / DASK_RS_SLURMD_PORT"
  saved=$(cat "$STATE/ctld/clustername" 2>/dev/null) || true
  if [ -n "$saved" ] && [ "$saved" != "$CLUSTER" ]; then
    say "discarding saved state of cluster \"$saved\" in $STATE/ctld"
    find "$STATE/ctld" -mindepth 1 -delete
  fi
  rm -f "$STATE/run/slurmctld.pid"
  /usr/sbin/slurmctld -D -R >>"$STATE/slurmctld.out" 2>&1 </dev/null &
  echo $! >"$STATE/slurmctld.pid"
  until_ok 30 ctld_up || { echo "slurmctld did not start:"; tail -20 "$STATE/slurmctld.out" "$STATE/log/slurmctld.log"; exit 1; }
  say "slurmctld pid $(cat "$STATE/slurmctld.pid") on port $CTLD_PORT"
fi
if ! live "$STATE/slurmd.pid" /usr/sbin/slurmd >/dev/null; then
  port_free "$SLURMD_PORT" slurmd "$STATE/slurmd.pid" /usr/sbin/slurmd "DASK_RS_SLURMCTLD_PORT / DASK_RS_SLURMD_PORT"
  rm -f "$STATE/run/slurmd.pid"
  /usr/sbin/slurmd -D >>"$STATE/slurmd.out" 2>&1 </dev/null &
  echo $! >"$STATE/slurmd.pid"
  say "slurmd pid $(cat "$STATE/slurmd.pid") on port $SLURMD_PORT"
fi
node_ok() { sinfo -h -n "$H" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)$'; }
if ! until_ok 15 node_ok; then
  scontrol update NodeName="$H" State=RESUME || true
  until_ok 30 node_ok || { echo "node $H not usable:"; sinfo -N -l; tail -20 "$STATE/slurmd.out" "$STATE/log/slurmd.log"; exit 1; }
fi
jid=$(sbatch --parsable -J smoke -o /dev/null --wrap true)
done_ok() { [ "$(squeue -h -t all -j "$jid" -o %T 2>/dev/null)" = COMPLETED ]; }
until_ok 60 done_ok || { echo "smoke job $jid did not complete:"; scontrol show job "$jid"; exit 1; }
say "ready: node $H, partition debug, $CPUS CPUs; export SLURM_CONF=$CONF"
