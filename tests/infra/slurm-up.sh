#!/usr/bin/env bash
# slurm-up.sh - a one-node SLURM (munged, slurmctld, slurmd) on this machine for the
# slurm backend's tests. Installs Debian's slurm-wlm and munge if missing, writes
# /etc/slurm/slurm.conf for this host (8 CPUs advertised, partition "debug", no
# accounting), starts the daemons in the foreground of background jobs, records their
# pids under $STATE and waits until a job really runs. Idempotent; stop with
# slurm-down.sh, which kills only the recorded pids. Needs root.
set -euo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/slurm
CPUS=${SLURM_CPUS:-8}
PKGS=(slurm-wlm slurmctld slurmd slurm-client munge)
CONF=/etc/slurm/slurm.conf

[ "$(id -u)" = 0 ] || { echo "slurm-up.sh: needs root" >&2; exit 1; }
TAG=slurm-up
. "$(dirname "$(readlink -f "$0")")/common.sh"

install_missing "${PKGS[@]}"
install -d -m 755 "$(dirname "$STATE")" "$STATE"

H=$(hostname -s)
install -d -o slurm -g slurm -m 755 /var/spool/slurmctld /var/log/slurm
install -d -m 755 /var/spool/slurmd
install -d -o munge -g munge -m 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1024 count=1 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
fi
MEM=$(awk '/MemTotal/ {m = int($2 / 1024); print (m < 8192 ? m : 8192)}' /proc/meminfo)
cat >"$CONF.tmp" <<CFG
# One node on loopback for dask-rs tests (tests/infra/slurm-up.sh).
ClusterName=daskrs
SlurmctldHost=$H(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
# pid files under the spool: package scripts act on /run/*.pid
SlurmctldPidFile=/var/spool/slurmctld/slurmctld.pid
SlurmdPidFile=/var/spool/slurmd/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
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

if ! pid=$(live "$STATE/munged.pid" /usr/sbin/munged); then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  setpriv --reuid=munge --regid=munge --init-groups -- /usr/sbin/munged --foreground >>"$STATE/munged.log" 2>&1 </dev/null &
  echo $! >"$STATE/munged.pid"
  until_ok 20 sh -c 'munge -n </dev/null | unmunge' || { echo "munged did not start"; tail "$STATE/munged.log"; exit 1; }
  say "munged pid $(cat "$STATE/munged.pid")"
fi
ctld_up() { [[ "$(scontrol ping 2>/dev/null)" == *"is UP"* ]]; }
if pid=$(live "$STATE/slurmctld.pid" /usr/sbin/slurmctld); then
  [ $changed = 1 ] && scontrol reconfigure
else
  /usr/sbin/slurmctld -D -R >>"$STATE/slurmctld.log" 2>&1 </dev/null &
  echo $! >"$STATE/slurmctld.pid"
  until_ok 30 ctld_up || { echo "slurmctld did not start"; tail -20 /var/log/slurm/slurmctld.log; exit 1; }
  say "slurmctld pid $(cat "$STATE/slurmctld.pid")"
fi
if ! pid=$(live "$STATE/slurmd.pid" /usr/sbin/slurmd); then
  /usr/sbin/slurmd -D >>"$STATE/slurmd.log" 2>&1 </dev/null &
  echo $! >"$STATE/slurmd.pid"
  say "slurmd pid $(cat "$STATE/slurmd.pid")"
fi
node_ok() { sinfo -h -n "$H" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)$'; }
if ! until_ok 15 node_ok; then
  scontrol update NodeName="$H" State=RESUME || true
  until_ok 30 node_ok || { echo "node $H not usable"; sinfo -N -l; tail -20 /var/log/slurm/slurmd.log; exit 1; }
fi
jid=$(sbatch --parsable -J smoke -o /dev/null --wrap true)
done_ok() { [ "$(squeue -h -t all -j "$jid" -o %T 2>/dev/null)" = COMPLETED ]; }
until_ok 60 done_ok || { echo "smoke job $jid did not complete"; scontrol show job "$jid"; exit 1; }
say "ready: node $H, partition debug, $CPUS CPUs"
