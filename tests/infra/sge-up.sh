#!/usr/bin/env bash
# sge-up.sh - a one-node Grid Engine cell (qmaster + execd) on this machine for the sge
# backend's tests. Installs Debian's gridengine if missing (debconf preseeded), makes
# this host admin/submit/exec host with queue all.q ($SGE_SLOTS slots) and PE smp,
# tunes the scheduler for quick starts, starts the daemons, records their pids under
# $STATE and waits until the exec host reports. Idempotent; stop with sge-down.sh.
# Needs root. Use with: export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
set -euo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/sge
SLOTS=${SGE_SLOTS:-8}
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
COMMON=$SGE_ROOT/$SGE_CELL/common
QMASTER=/usr/lib/gridengine/sge_qmaster
EXECD=/usr/lib/gridengine/sge_execd
RUN=/run/gridengine
PKGS=(gridengine-master gridengine-exec gridengine-client)

[ "$(id -u)" = 0 ] || { echo "sge-up.sh: needs root" >&2; exit 1; }
TAG=sge-up
. "$(dirname "$(readlink -f "$0")")/common.sh"
# has LINE CMD...: CMD's output has exactly this line (output captured first: no SIGPIPE)
has() { local l=$1 out; shift; out=$("$@" 2>/dev/null) || true; grep -qxF -- "$l" <<<"$out"; }

H=$(hostname)
# debconf answers the packages ask on a first install
if [ "$(dpkg-query -W -f='${Status}' gridengine-master 2>/dev/null)" != "install ok installed" ]; then
  debconf-set-selections <<SEL
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string $SGE_CELL
gridengine-master shared/gridenginemaster string $H
SEL
fi
install_missing "${PKGS[@]}"
install -d -m 755 "$(dirname "$STATE")" "$STATE"

if [ ! -e /var/spool/gridengine/spooldb/sge ]; then
  install -d -o sgeadmin -g sgeadmin -m 755 /var/spool/gridengine /var/spool/gridengine/spooldb \
    /var/spool/gridengine/qmaster /var/spool/gridengine/qmaster/job_scripts "$SGE_ROOT/$SGE_CELL" "$COMMON"
  [ -s "$COMMON/bootstrap" ] || install -m 644 -o sgeadmin -g sgeadmin /usr/share/gridengine/default-bootstrap "$COMMON/bootstrap"
  su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL /var/spool/gridengine/spooldb sgeadmin" sgeadmin
fi
install -d -o sgeadmin -g sgeadmin -m 755 /var/spool/gridengine/execd "$RUN"
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
if ! live "$STATE/qmaster.pid" "$QMASTER" >/dev/null; then
  rm -f "$RUN/qmaster.pid"
  SGE_QMASTER_PIDFILE=$RUN/qmaster.pid /usr/sbin/sge_qmaster >>"$STATE/qmaster.log" 2>&1 </dev/null
  until_ok 60 qm_up || { echo "sge_qmaster did not start"; tail -20 /var/spool/gridengine/qmaster/messages; exit 1; }
  cp "$RUN/qmaster.pid" "$STATE/qmaster.pid"
  say "sge_qmaster pid $(cat "$STATE/qmaster.pid")"
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
  rm -f "$RUN/execd.pid"
  SGE_EXECD_PIDFILE=$RUN/execd.pid /usr/sbin/sge_execd >>"$STATE/execd.log" 2>&1 </dev/null
  until_ok 10 live "$RUN/execd.pid" "$EXECD" || { echo "sge_execd did not start"; cat "$STATE/execd.log"; exit 1; }
  cp "$RUN/execd.pid" "$STATE/execd.pid"
  say "sge_execd pid $(cat "$STATE/execd.pid")"
fi
ready() {
  qhost -h "$H" 2>/dev/null | awk -v h="$H" '$1==h && $7!="-" {ok=1} END{exit !ok}' || return 1
  qstat -f -q "all.q@$H" 2>/dev/null | awk -v q="all.q@$H" '$1==q {f=1; st=$6} END{exit !(f && st=="")}'
}
until_ok 60 ready || { echo "exec host $H not ready"; qhost; qstat -f; exit 1; }
say "ready: host $H, queue all.q ($SLOTS slots), PE smp; export SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL"
