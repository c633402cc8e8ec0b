#!/usr/bin/env bash
# Two network namespaces, rv-src (10.77.0.1) and rv-dst (10.77.0.2), joined by a veth pair
# shaped with tc (token bucket) to RATE in both directions, for `ringvisor bench migrate
# --link`. Needs root and iproute2.
#   scripts/netns.sh up [RATE]   # RATE as tc writes it: 1gbit (default), 10gbit, 128mbit
#   scripts/netns.sh down
set -euo pipefail
cmd=${1:-}
rate=${2:-1gbit}
case "$cmd" in
up)
  "$0" down 2>/dev/null || true
  ip netns add rv-src
  ip netns add rv-dst
  ip link add rv-veth-s type veth peer name rv-veth-d
  ip link set rv-veth-s netns rv-src
  ip link set rv-veth-d netns rv-dst
  ip -n rv-src addr add 10.77.0.1/24 dev rv-veth-s
  ip -n rv-dst addr add 10.77.0.2/24 dev rv-veth-d
  for ns in rv-src rv-dst; do ip -n "$ns" link set lo up; done
  ip -n rv-src link set rv-veth-s up
  ip -n rv-dst link set rv-veth-d up
  # burst must cover at least one timer tick at the rate; 4 MiB does up to ~10 Gbit/s.
  tc -n rv-src qdisc add dev rv-veth-s root tbf rate "$rate" burst 4mb latency 100ms
  tc -n rv-dst qdisc add dev rv-veth-d root tbf rate "$rate" burst 4mb latency 100ms
  echo "rv-src 10.77.0.1 <-> rv-dst 10.77.0.2, shaped to $rate"
  ;;
down)
  ip netns del rv-src 2>/dev/null || true
  ip netns del rv-dst 2>/dev/null || true
  ;;
*)
  echo "usage: $0 up [RATE] | down" >&2
  exit 2
  ;;
esac
