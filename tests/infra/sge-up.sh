#!/usr/bin/env bash
# sge-up.sh - a one-node Grid Engine cell (qmaster + execd) on this machine for the sge
# backend's tests. Installs Debian's gridengine if missing, makes this host
# admin/submit/exec host with queue all.q ($SGE_SLOTS slots) and PE smp, tunes the
# scheduler for quick starts, starts the daemons and waits until the exec host reports.
#
# Everything it creates is its own: the cell "daskrs" ($SGE_ROOT/daskrs, next to any
# other cell), spool, pid and log files under $STATE, and its own ports
# ($DASK_RS_SGE_QMASTER_PORT, default 6544; $DASK_RS_SGE_EXECD_PORT, default 6545). The
# variables a client needs are written to $STATE/env. It never reads or changes another
# cell (such as Debian's "default") or /var/spool/gridengine, so another Grid Engine on
# this machine, running or stale, is neither used nor disturbed.
#
# Idempotent, and safe after a run that was killed halfway: a recorded daemon that does
# not answer is stopped by its recorded pid and started again; a spool left half
# initialised is made again. When a port it needs is held by a process it did not
# start, it stops at once and names that process. Stop with sge-down.sh. Needs root.
set -euo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/sge
SLOTS=${SGE_SLOTS:-8}
export SGE_ROOT=/var/lib/gridengine SGE_CELL=daskrs
export SGE_QMASTER_PORT=${DASK_RS_SGE_QMASTER_PORT:-6544} SGE_EXECD_PORT=${DASK_RS_SGE_EXECD_PORT:-6545}
COMMON=$SGE_ROOT/$SGE_CELL/common
QMASTER=/usr/lib/gridengine/sge_qmaster
EXECD=/usr/lib/gridengine/sge_execd
PKGS=(gridengine-master gridengine-exec gridengine-client)

[ "$(id -u)" = 0 ] || { echo "sge-up.sh: needs root" >&2; exit 1; }
TAG=sge-up
. "$(dirname "$(readlink -f "$0")")/common.sh"
# has LINE CMD...: CMD's output has exactly this line (output captured first: no SIGPIPE)
has() { local l=$1 out; shift; out=$("$@" 2>/dev/null) || true; grep -qxF -- "$l" <<<"$out"; }

H=$(hostname)
# Debian's packages configure their own cell on a first install; ours is made below.
if [ "$(dpkg-query -W -f='${Status}' gridengine-master 2>/dev/null)" != "install ok installed" ]; then
  debconf-set-selections <<SEL
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string default
gridengine-master shared/gridenginemaster string $H
SEL
fi
install_missing "${PKGS[@]}"
install -d -m 755 "$(dirname "$STATE")" "$STATE"
printf 'SGE_ROOT=%s\nSGE_CELL=%s\nSGE_QMASTER_PORT=%s\nSGE_EXECD_PORT=%s\n' \
  "$SGE_ROOT" "$SGE_CELL" "$SGE_QMASTER_PORT" "$SGE_EXECD_PORT" >"$STATE/env"

# The cell: bootstrap naming our spool, then the spool itself. "initialised" is written
# last, so a run killed in between starts the spool again.
install -d -o sgeadmin -g sgeadmin -m 755 "$SGE_ROOT/$SGE_CELL" "$COMMON" "$STATE/run" "$STATE/execd"
if [ ! -e "$STATE/initialised" ]; then
  stop_recorded sge_execd "$STATE/execd.pid" "$EXECD" 30
  stop_recorded sge_qmaster "$STATE/qmaster.pid" "$QMASTER" 30
  rm -rf "$STATE/spooldb" "$STATE/qmaster"
  install -d -o sgeadmin -g sgeadmin -m 755 "$STATE/spooldb" "$STATE/qmaster" "$STATE/qmaster/job_scripts"
  sed -e "s#^spooling_params .*#spooling_params         $STATE/spooldb#" \
    -e "s#^qmaster_spool_dir .*#qmaster_spool_dir       $STATE/qmaster#" \
    /usr/share/gridengine/default-bootstrap >"$COMMON/bootstrap"
  sed -e "s#^execd_spool_dir .*#execd_spool_dir        $STATE/execd#" \
    /usr/share/gridengine/default-configuration >"$STATE/configuration"
  chown sgeadmin:sgeadmin "$COMMON/bootstrap" "$STATE/configuration"
  su -s /bin/sh sgeadmin -c "
    set -e; export SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL
    /usr/lib/gridengine/spoolinit berkeleydb libspoolb $STATE/spooldb init
    /usr/lib/gridengine/spooldefaults configuration $STATE/configuration
    /usr/lib/gridengine/spooldefaults complexes /usr/share/gridengine/util/resources/centry
    /usr/lib/gridengine/spooldefaults usersets /usr/share/gridengine/util/resources/usersets
    /usr/lib/gridengine/spooldefaults managers sgeadmin" >"$STATE/init.log" 2>&1 \
    || { echo "initialising the spool failed:"; cat "$STATE/init.log"; exit 1; }
  touch "$STATE/initialised"
fi
if [ "$(cat "$COMMON/act_qmaster" 2>/dev/null)" != "$H" ]; then
  echo "$H" >"$COMMON/act_qmaster"; chown sgeadmin:sgeadmin "$COMMON/act_qmaster"
fi
# 127.0.0.1 reverse-resolves to "localhost" while the host calls itself $H: alias them.
ip=$(getent ahostsv4 "$H" | awk 'NR==1{print $1}')
aliases=""
for n in $(getent hosts "${ip:-127.0.0.1}" | awk '{for (i = 2; i <= NF; i++) print $i}') localhost; do
  [ "$n" != "$H" ] && case " $aliases " in *" $n "*) ;; *) aliases="$aliases $n" ;; esac
done
[ "$(cat "$COMMON/host_aliases" 2>/dev/null)" = "$H$aliases" ] || echo "$H$aliases" >"$COMMON/host_aliases"

qm_up() { qconf -sh; }
if live "$STATE/qmaster.pid" "$QMASTER" >/dev/null && ! until_ok 5 qm_up; then
  say "the recorded sge_qmaster does not answer on port $SGE_QMASTER_PORT: restarting it"
  stop_recorded sge_qmaster "$STATE/qmaster.pid" "$QMASTER" 30
fi
if ! live "$STATE/qmaster.pid" "$QMASTER" >/dev/null; then
  port_free "$SGE_QMASTER_PORT" sge_qmaster "$STATE/qmaster.pid" "$QMASTER" "DASK_RS_SGE_QMASTER_PORT / DASK_RS_SGE_EXECD_PORT"
  rm -f "$STATE/run/qmaster.pid" "$STATE/qmaster/lock"
  SGE_QMASTER_PIDFILE=$STATE/run/qmaster.pid /usr/sbin/sge_qmaster >>"$STATE/qmaster.log" 2>&1 </dev/null
  until_ok 60 qm_up || { echo "sge_qmaster did not start:"; tail -20 "$STATE/qmaster.log" "$STATE/qmaster/messages"; exit 1; }
  cp "$STATE/run/qmaster.pid" "$STATE/qmaster.pid"
  say "sge_qmaster pid $(cat "$STATE/qmaster.pid") on port $SGE_QMASTER_PORT"
fi
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
# root may submit; no mail; jobs run with a plain (non-login) shell
# (qconf -Mconf takes the configuration's name from the file's name)
mkdir "$W/new"
qconf -sconf global >"$W/global"
sed -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' -e 's#^mailer .*#mailer /bin/true#' \
  -e 's/^login_shells .*/login_shells none/' "$W/global" >"$W/new/global"
diff -qw "$W/global" "$W/new/global" >/dev/null || qconf -Mconf "$W/new/global" >/dev/null
# schedule every second, with no load adjustments holding jobs back
qconf -ssconf >"$W/s"
sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' -e 's/^flush_submit_sec .*/flush_submit_sec 1/' \
  -e 's/^flush_finish_sec .*/flush_finish_sec 1/' -e 's/^job_load_adjustments .*/job_load_adjustments NONE/' \
  -e 's/^load_adjustment_decay_time .*/load_adjustment_decay_time 0:0:0/' "$W/s" >"$W/s.new"
diff -qw "$W/s" "$W/s.new" >/dev/null || qconf -Msconf "$W/s.new" >/dev/null
has "$H" qconf -sh || qconf -ah "$H" >/dev/null
has "$H" qconf -ss || qconf -as "$H" >/dev/null
if ! has "$H" qconf -sel; then
  printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$H" >"$W/e"
  qconf -Ae "$W/e" >/dev/null
fi
if ! has @allhosts qconf -shgrpl; then
  printf 'group_name @allhosts\nhostlist %s\n' "$H" >"$W/h"; qconf -Ahgrp "$W/h" >/dev/null
fi
if ! has smp qconf -spl; then
  printf 'pe_name smp\nslots 9999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\nstop_proc_args NONE\nallocation_rule $pe_slots\ncontrol_slaves FALSE\njob_is_first_task TRUE\nurgency_slots min\naccounting_summary FALSE\nqsort_args NONE\n' >"$W/p"
  qconf -Ap "$W/p" >/dev/null
fi
{
  printf 'qname all.q\nhostlist @allhosts\nseq_no 0\nload_thresholds NONE\nsuspend_thresholds NONE\nnsuspend 1\n'
  printf 'suspend_interval 00:05:00\npriority 0\nmin_cpu_interval 00:05:00\nprocessors UNDEFINED\nqtype BATCH INTERACTIVE\n'
  printf 'ckpt_list NONE\npe_list smp\nrerun FALSE\nslots %s\ntmpdir /tmp\nshell /bin/bash\nprolog NONE\nepilog NONE\n' "$SLOTS"
  printf 'shell_start_mode posix_compliant\nstarter_method NONE\nsuspend_method NONE\nresume_method NONE\n'
  printf 'terminate_method NONE\nnotify 00:00:60\nowner_list NONE\nuser_lists NONE\nxuser_lists NONE\n'
  printf 'subordinate_list NONE\ncomplex_values NONE\nprojects NONE\nxprojects NONE\ncalendar NONE\ninitial_state default\n'
  for l in rt cpu fsize data stack core rss vmem; do printf 's_%s INFINITY\nh_%s INFINITY\n' "$l" "$l"; done
} >"$W/q"
if ! has all.q qconf -sql; then
  qconf -Aq "$W/q" >/dev/null
elif [ "$(qconf -sq all.q | awk '$1=="slots"{print $2}')" != "$SLOTS" ]; then
  qconf -Mq "$W/q" >/dev/null
fi

if ! live "$STATE/execd.pid" "$EXECD" >/dev/null; then
  port_free "$SGE_EXECD_PORT" sge_execd "$STATE/execd.pid" "$EXECD" "DASK_RS_SGE_QMASTER_PORT / DASK_RS_SGE_EXECD_PORT"
  rm -f "$STATE/run/execd.pid"
  SGE_EXECD_PIDFILE=$STATE/run/execd.pid /usr/sbin/sge_execd >>"$STATE/execd.log" 2>&1 </dev/null
  until_ok 10 live "$STATE/run/execd.pid" "$EXECD" || { echo "sge_execd did not start:"; cat "$STATE/execd.log"; exit 1; }
  cp "$STATE/run/execd.pid" "$STATE/execd.pid"
  say "sge_execd pid $(cat "$STATE/execd.pid") on port $SGE_EXECD_PORT"
fi
ready() {
  qhost -h "$H" 2>/dev/null | awk -v h="$H" '$1==h && $7!="-" {ok=1} END{exit !ok}' || return 1
  qstat -f -q "all.q@$H" 2>/dev/null | awk -v q="all.q@$H" '$1==q {f=1; st=$6} END{exit !(f && st=="")}'
}
until_ok 60 ready || { echo "exec host $H not ready:"; qhost; qstat -f; tail -20 "$STATE/execd/$H/messages" 2>/dev/null; exit 1; }
say "ready: host $H, queue all.q ($SLOTS slots), PE smp; export $(tr '\n' ' ' <"$STATE/env")"
