# common.sh - helpers the tests/infra scripts source: logging, pid checks,
# package installs and stopping a recorded pid. Never kills by name.
# The sourcing script sets TAG (its name in log lines) before sourcing.

say() { printf '[%s] %s\n' "${TAG:-infra}" "$*"; }

# live PIDFILE EXE: print the recorded pid if it runs EXE and is not a zombie
live() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && [ -d "/proc/$pid" ] || return 1
  [ "$(readlink -f "/proc/$pid/exe")" = "$(readlink -f "$2")" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ] || return 1
  echo "$pid"
}

# until_ok SECONDS CMD...: retry CMD every 0.1 s
until_ok() {
  local n=$(($1 * 10)); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# install_missing PKG...: apt-get install the Debian packages not yet installed,
# without letting their scripts start system daemons (policy-rc.d exits 101)
install_missing() {
  local p missing=() made=0
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  say "installing ${missing[*]}"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made=1
  fi
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  [ $made = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

# stop_recorded LABEL PIDFILE EXE [SECONDS]: SIGTERM the recorded pid if it still runs
# EXE, SIGKILL it after SECONDS (default 15), then forget the pid file
stop_recorded() {
  local pid
  if pid=$(live "$2" "$3"); then
    kill -TERM "$pid"
    for _ in $(seq 1 $((${4:-15} * 10))); do live "$2" "$3" >/dev/null || break; sleep 0.1; done
    live "$2" "$3" >/dev/null && kill -KILL "$pid"
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$2"
}

# port_free PORT DAEMON PIDFILE EXE VARS: fail at once, naming the holder, when a
# process these scripts did not start (not the live pid recorded in PIDFILE)
# listens on PORT; VARS names the variables that choose other ports
port_free() {
  local holder ours
  holder=$(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2) || true
  [ -n "$holder" ] || return 0
  ours=$(live "$3" "$4") || true
  [ "$holder" = "$ours" ] && return 0
  echo "$TAG.sh: port $1, which our $2 needs, is held by pid $holder ($(tr '\0' ' ' </proc/"$holder"/cmdline 2>/dev/null))," >&2
  echo "  a process these scripts did not start. Stop it, or choose other ports with $5." >&2
  exit 1
}
