#!/usr/bin/env bash
# An emulated cluster on one Linux machine: N "nodes" as network namespaces, each with its own
# address and sshd, joined by a bridge, every node's link shaped with tc (rate, optional delay).
#
#   sudo launch/cluster.sh up --nodes 2 --rate 200mbit [--delay 2ms] [--mtu 9000]
#   (--rate none: links not shaped, for an unconstrained reference)
#   launch/cluster.sh status
#   sudo launch/cluster.sh run [--gloo] -np 2 .venv/bin/python examples/fashion_mnist_cnn.py ...
#   sudo launch/cluster.sh down
#
# Everything lives under $HVD_GRADQ_CACHE/cluster (default ~/.cache/hvd_gradq/cluster): the ssh
# key pair, the nodes' host key, an ssh config and known_hosts, and a `ssh` wrapper that uses
# them. The user's ~/.ssh is never read or written. `up` is idempotent (it tears down first);
# `down` kills the sshds, deletes the namespaces and the bridge, and removes the cluster folder.
# Node i is namespace hvdgq<i> with address 10.77.0.<i> on its eth0; horovodrun runs inside node 1,
# so all traffic stays on the addresses of these namespaces.
# One job at a time: a benchmark sweep or a test holds $HVD_GRADQ_CLUSTER_LOCK (default
# /run/lock/hvdgq-cluster.lock, flock) while it uses the cluster and marks its children with
# HVD_GRADQ_CLUSTER_HELD=1 (benchmarks/cluster.py); up, down and run from anyone else are refused
# with exit status 75 while it is held, instead of tearing down or joining a cluster in use.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${HVD_GRADQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_gradq}"
DIR="$CACHE/cluster"
NS=hvdgq
BRIDGE=hvdgq-br
SUBNET=10.77.0

LOCK="${HVD_GRADQ_CLUSTER_LOCK:-/run/lock/hvdgq-cluster.lock}"

die() { echo "[cluster] $*" >&2; exit 1; }
log() { echo "[cluster] $*" >&2; }

check_free() {  # exit 75 if another job holds the cluster (its own children pass)
  [ "${HVD_GRADQ_CLUSTER_HELD:-}" = 1 ] && return 0
  [ -e "$LOCK" ] || return 0
  flock -n "$LOCK" true 2>/dev/null && return 0
  echo "[cluster] busy: another job holds the cluster ($LOCK: $(cat "$LOCK" 2>/dev/null)); wait for it to end" >&2
  exit 75
}

need_root() {
  [ "$(id -u)" = 0 ] || die "network namespaces, bridges and tc need root: run 'sudo $0 $*'"
}

nodes_up() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS}[0-9]+$" | sort -V || true; }

ensure_tools() {
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v tc >/dev/null || missing+=(iproute2)
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v ssh >/dev/null || missing+=(openssh-client)
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  fi
}

cmd_down() {
  need_root down
  for pid in "$DIR"/sshd*.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  for ns in $(nodes_up); do
    # anything still running in the namespace (sshd children, stray workers) goes with it
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns"
  done
  rm -rf /etc/netns/${NS}[0-9]*
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
  rm -rf "$DIR"
  log "down: no namespaces, bridge or sshd left"
}

burst_bytes() {  # 2 ms of line rate, at least 32 KiB: a short burst, so small payloads are shaped too
  local r=${1,,} bits
  case "$r" in
    *gbit) bits=$(( ${r%gbit} * 1000000000 )) ;;
    *mbit) bits=$(( ${r%mbit} * 1000000 )) ;;
    *kbit) bits=$(( ${r%kbit} * 1000 )) ;;
    *) die "--rate must be an integer with gbit, mbit or kbit (e.g. 200mbit), got $1" ;;
  esac
  local b=$(( bits / 8 / 500 ))
  [ "$b" -lt 32768 ] && b=32768
  echo "$b"
}

shape() {  # shape <netns or ''> <dev> <rate> <delay>
  local ns=$1 dev=$2 rate=$3 delay=$4 run=() burst
  burst=$(burst_bytes "$rate")
  [ -n "$ns" ] && run=(ip netns exec "$ns")
  "${run[@]}" tc qdisc del dev "$dev" root 2>/dev/null || true
  if [ "$delay" != 0 ] && [ "$delay" != 0ms ]; then
    "${run[@]}" tc qdisc add dev "$dev" root handle 1: netem delay "$delay"
    "${run[@]}" tc qdisc add dev "$dev" parent 1: handle 2: tbf rate "$rate" burst "$burst" latency 200ms
  else
    "${run[@]}" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 200ms
  fi
}

cmd_up() {
  local n=2 rate=1gbit delay=0 mtu=9000
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) n=$2; shift 2 ;;
      --rate) rate=$2; shift 2 ;;
      --delay) delay=$2; shift 2 ;;
      --mtu) mtu=$2; shift 2 ;;
      *) die "unknown option $1 (up takes --nodes N --rate 200mbit --delay 2ms --mtu 9000)" ;;
    esac
  done
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 16 ] || die "--nodes must be 1..16, got $n"
  need_root up
  ensure_tools
  [ -z "$(nodes_up)" ] || cmd_down
  mkdir -p "$DIR/bin" /run/sshd
  chmod 700 "$DIR"
  ssh-keygen -q -t ed25519 -N '' -C hvd_gradq-cluster -f "$DIR/id_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C hvd_gradq-node -f "$DIR/host_ed25519"
  cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys"
  cat >"$DIR/ssh_config" <<EOF
Host ${SUBNET}.*
  User root
  IdentityFile $DIR/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $DIR/known_hosts
  StrictHostKeyChecking no
  LogLevel ERROR
EOF
  cat >"$DIR/bin/ssh" <<EOF
#!/bin/sh
exec /usr/bin/ssh -F "$DIR/ssh_config" "\$@"
EOF
  chmod +x "$DIR/bin/ssh"
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" mtu "$mtu" up
  local hosts=()
  for i in $(seq 1 "$n"); do
    local ns="$NS$i" addr="$SUBNET.$i"
    # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts: inside node i the machine's
    # hostname resolves to the node's own address (Gloo advertises what the hostname resolves to)
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n::1 localhost\n%s %s\n' "$addr" "$(hostname)" >"/etc/netns/$ns/hosts"
    ip netns add "$ns"
    ip link add "$ns-h" mtu "$mtu" type veth peer name "$ns-n" mtu "$mtu"
    ip link set "$ns-n" netns "$ns"
    ip netns exec "$ns" ip link set "$ns-n" name eth0
    ip netns exec "$ns" ip addr add "$addr/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip link set lo up
    ip link set "$ns-h" master "$BRIDGE" up
    if [ "$rate" != none ]; then  # --rate none: unshaped veth links (the unconstrained reference)
      shape "" "$ns-h" "$rate" "$delay"     # towards the node
      shape "$ns" eth0 "$rate" "$delay"     # from the node
    fi
    ip netns exec "$ns" /usr/sbin/sshd -f /dev/null -h "$DIR/host_ed25519" \
      -o ListenAddress="$addr" -o PidFile="$DIR/sshd$i.pid" -o AuthorizedKeysFile="$DIR/authorized_keys" \
      -o StrictModes=no -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no -o UsePAM=no \
      -o AcceptEnv='*'
    hosts+=("$addr:1")
  done
  local IFS=,
  echo "${hosts[*]}" >"$DIR/hosts"
  unset IFS
  local burst=unshaped
  [ "$rate" = none ] || burst=$(burst_bytes "$rate")
  printf '%s\n' "nodes=$n" "rate=$rate" "burst=$burst" "delay=$delay" "mtu=$mtu" >"$DIR/settings"
  for i in $(seq 1 "$n"); do  # every node must reach every node over ssh before we say "up"
    for try in $(seq 1 50); do
      ip netns exec "${NS}1" "$DIR/bin/ssh" -o ConnectTimeout=2 "$SUBNET.$i" true 2>/dev/null && break
      [ "$try" = 50 ] && die "node $i ($SUBNET.$i) does not answer ssh"
      sleep 0.2
    done
  done
  log "up: $n nodes $(cat "$DIR/hosts") at $rate${delay:+, delay $delay}, mtu $mtu"
}

cmd_status() {
  local up
  up="$(nodes_up)"
  if [ -z "$up" ]; then echo "down"; return 0; fi
  echo "up: $(echo "$up" | tr '\n' ' ')"
  [ -f "$DIR/settings" ] && cat "$DIR/settings"
  [ -f "$DIR/hosts" ] && echo "hosts=$(cat "$DIR/hosts")"
}

cmd_run() {  # horovodrun across the nodes, launched from node 1 ([--mpi|--gloo] first; default --mpi);
  # MPI yields when idle unless the caller set OMPI_MCA_mpi_yield_when_idle (see launch/hvdrun)
  [ -f "$DIR/hosts" ] || die "the cluster is down: run 'sudo $0 up' first"
  need_root run
  local controller=--mpi
  case "${1:-}" in --mpi|--gloo) controller=$1; shift ;; esac
  local venv="${HVD_GRADQ_VENV:-$ROOT/.venv}"
  cd "$ROOT"
  exec ip netns exec "${NS}1" env PATH="$DIR/bin:$venv/bin:$PATH" \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}" \
    "$venv/bin/horovodrun" "$controller" -H "$(cat "$DIR/hosts")" --network-interface eth0 "$@"
}

case "${1:-}" in
  up) shift; check_free; cmd_up "$@" ;;
  down) check_free; cmd_down ;;
  status) cmd_status ;;
  run) shift; check_free; cmd_run "$@" ;;
  hosts) cat "$DIR/hosts" ;;
  dir) echo "$DIR" ;;
  *) die "usage: $0 up [--nodes N --rate R --delay D --mtu M] | down | status | run HOROVODRUN-ARGS | hosts | dir" ;;
esac
