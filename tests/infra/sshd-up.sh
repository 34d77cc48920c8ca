#!/usr/bin/env bash
# sshd-up.sh - test hosts for the ssh backend: N network namespaces on a private
# bridge, each with its own hostname and an sshd (key login for root only).
#
#   host i: netns dkrssh<i>, hostname dkrhost<i>, sshd on 10.77.41.(10+i):22
#   this machine: 10.77.41.1 on bridge dkrbr0 (the subnet exists nowhere else)
#
# The namespaces share files, users and pids with this machine, not its network:
# a scheduler the hosts must reach listens on 10.77.41.1 or 0.0.0.0.
# Writes $STATE/ssh_config (Host dkrhost<i>) and $STATE/env. Idempotent, and safe
# after a run killed halfway: an sshd left in one of its namespaces without a live
# recorded pid is stopped and started again. When the subnet is already in use on
# another interface, it stops at once and names that interface.
# Stop with sshd-down.sh, which kills only the pids recorded here and what runs in
# its own namespaces.
# Needs root. Installs openssh-server/client and iproute2 from Debian if missing.
set -euo pipefail
STATE=${DASK_RS_TEST_STATE:-/var/lib/dask-rs-tests}/sshd
NHOSTS=${SSH_HOSTS:-2}
PKGS=(openssh-server openssh-client iproute2 util-linux)
BR=dkrbr0
GW=10.77.41.1

[ "$(id -u)" = 0 ] || { echo "sshd-up.sh: needs root" >&2; exit 1; }
TAG=sshd-up
. "$(dirname "$(readlink -f "$0")")/common.sh"
banner() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/22 && head -c 4 <&3" 2>/dev/null | grep -q SSH-; }

install_missing "${PKGS[@]}"

# sshd's StrictModes checks every directory up to /: keys stay out of /tmp.
install -d -m 755 "$(dirname "$STATE")"
install -d -m 700 "$STATE"
install -d -m 755 /run/sshd
[ -s "$STATE/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/host_key"
[ -s "$STATE/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/client_key"
install -m 600 "$STATE/client_key.pub" "$STATE/authorized_keys"

touch "$STATE/created"
other=$(ip -o -4 addr show | awk -v br="$BR" '$2 != br && $4 ~ /^10\.77\.41\./ {print $2 " (" $4 ")"}' | head -1)
if [ -n "$other" ]; then
  echo "sshd-up.sh: the test subnet 10.77.41.0/24 is already used by interface $other, which" >&2
  echo "  these scripts did not create; remove that address or run the ssh tests elsewhere." >&2
  exit 1
fi
if ! ip link show "$BR" >/dev/null 2>&1; then ip link add "$BR" type bridge; fi
grep -qxF "bridge $BR" "$STATE/created" || echo "bridge $BR" >>"$STATE/created"
addrs=$(ip -o -4 addr show dev "$BR")
[[ $addrs == *"inet $GW/24 "* ]] || ip addr add "$GW/24" dev "$BR"
ip link set "$BR" up

{
  printf 'Host *\n  User root\n  IdentityFile %s\n  IdentitiesOnly yes\n' "$STATE/client_key"
  printf '  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n'
} >"$STATE/ssh_config.tmp"
for i in $(seq 1 "$NHOSTS"); do
  ns=dkrssh$i; ip4=10.77.41.$((10 + i))
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  grep -qxF "netns $ns" "$STATE/created" || echo "netns $ns" >>"$STATE/created"
  if ! ip link show "$ns-h" >/dev/null 2>&1; then
    ip link add "$ns-h" type veth peer name "$ns-n"
  fi
  # (a run killed between creating the pair and moving one end leaves it here)
  if ip link show "$ns-n" >/dev/null 2>&1; then ip link set "$ns-n" netns "$ns"; fi
  ip link set "$ns-h" master "$BR" up
  addrs=$(ip -n "$ns" -o -4 addr show dev "$ns-n")
  [[ $addrs == *"inet $ip4/24 "* ]] || ip -n "$ns" addr add "$ip4/24" dev "$ns-n"
  ip -n "$ns" link set "$ns-n" up
  ip -n "$ns" link set lo up
  cat >"$STATE/sshd_config.$ns" <<CFG
ListenAddress $ip4
Port 22
HostKey $STATE/host_key
PidFile $STATE/sshd-$ns.pid.sshd
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
LogLevel VERBOSE
CFG
  if pid=$(live "$STATE/sshd-$ns.pid" /usr/sbin/sshd); then
    say "dkrhost$i: sshd already running (pid $pid)"
  else
    # Whatever runs in our own namespace without a live recorded pid was left by a run
    # killed halfway (an sshd holding port 22, say): stop it so ours can listen.
    left=$(ip netns pids "$ns" | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
      say "stopping processes left in $ns by an earlier run: $left"
      # shellcheck disable=SC2086
      kill -TERM $left 2>/dev/null || true
      until_ok 5 sh -c "[ -z \"\$(ip netns pids $ns)\" ]" || { kill -KILL $left 2>/dev/null || true; }
    fi
    # netns exec -> unshare --uts (own hostname) -> exec sshd -D: $! is sshd itself.
    ip netns exec "$ns" unshare --uts /bin/sh -c "hostname dkrhost$i && exec /usr/sbin/sshd -D -e -f $STATE/sshd_config.$ns" \
      >>"$STATE/sshd-$ns.log" 2>&1 </dev/null &
    echo $! >"$STATE/sshd-$ns.pid"
    for _ in $(seq 1 100); do banner "$ip4" && break; sleep 0.1; done
    banner "$ip4" || { echo "sshd in $ns did not start:"; tail "$STATE/sshd-$ns.log"; exit 1; }
    say "dkrhost$i: sshd pid $(cat "$STATE/sshd-$ns.pid") on $ip4:22"
  fi
  printf 'Host dkrhost%s\n  HostName %s\n' "$i" "$ip4" >>"$STATE/ssh_config.tmp"
done
mv "$STATE/ssh_config.tmp" "$STATE/ssh_config"
for i in $(seq 1 "$NHOSTS"); do
  out=$(ssh -F "$STATE/ssh_config" "dkrhost$i" hostname) || { echo "ssh dkrhost$i failed"; exit 1; }
  [ "$out" = "dkrhost$i" ] || { echo "dkrhost$i answered as $out"; exit 1; }
done
printf 'DASK_RS_TEST_SSH_CONFIG=%s\nDASK_RS_TEST_SSH_GATEWAY=%s\nDASK_RS_TEST_SSH_HOSTS=%s\n' \
  "$STATE/ssh_config" "$GW" "$(seq -s, -f 'dkrhost%g' 1 "$NHOSTS")" >"$STATE/env"
say "ready: ssh -F $STATE/ssh_config dkrhost1"
