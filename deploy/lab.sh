#!/usr/bin/env bash
# The network-namespace lab of the end-to-end tests: client ── gateway ── server.
#
#   client ns  <P>-client  <P>c0 198.51.100.10/24 ─┐   (LAN, TEST-NET-2, RFC 5737)
#   gateway ns <P>-gw      <P>g0 198.51.100.1/24  ─┘
#                          <P>g1 203.0.113.1/24   ─┐   (WAN, TEST-NET-3, RFC 5737)
#   server ns  <P>-server  <P>s0 203.0.113.53/24  ─┘
#
# The gateway forwards between the two and carries deploy/nftables.conf with
# LAN_IF/WAN_IF set to its veths and DNS_PORT/PROXY_PORT from the environment.
# The addresses are documentation ranges that exist only inside these
# namespaces; nothing is routed to or from the host's own network.
#
# Usage: deploy/lab.sh up|down|status|nft
#   LW_LAB=lw          prefix of namespace and interface names (<= 6 characters)
#   LW_DNS_PORT=5353   port the shim listens on in the gateway
#   LW_PROXY_PORT=8080 port the proxy listens on in the gateway
# `up` and `down` are idempotent: `up` on a running lab rebuilds it, `down` on
# no lab does nothing. Needs root (ip netns, nft).
set -euo pipefail

P=${LW_LAB:-lw}
DNS_PORT=${LW_DNS_PORT:-5353}
PROXY_PORT=${LW_PROXY_PORT:-8080}
HERE=$(cd "$(dirname "$0")" && pwd)

NS_C=$P-client NS_G=$P-gw NS_S=$P-server
LAN_C=${P}c0 LAN_G=${P}g0 WAN_G=${P}g1 WAN_S=${P}s0

CLIENT_IP=198.51.100.10 GW_LAN_IP=198.51.100.1
GW_WAN_IP=203.0.113.1   SERVER_IP=203.0.113.53

if [ ${#P} -gt 6 ]; then echo "lab.sh: LW_LAB must be at most 6 characters" >&2; exit 2; fi

need_root() {
  if [ "$(id -u)" != 0 ]; then echo "lab.sh: needs root (ip netns, nft)" >&2; exit 1; fi
  command -v ip >/dev/null || { echo "lab.sh: iproute2 (ip) is missing" >&2; exit 1; }
}

down() {
  local ns
  for ns in "$NS_C" "$NS_G" "$NS_S"; do
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
      # Processes the tests started inside are theirs to stop; deleting the
      # namespace removes its veths (and with them the peer ends).
      ip netns del "$ns"
    fi
  done
}

nft_rules() {
  # deploy/nftables.conf with the lab's interfaces and ports.
  sed -e "s/^define LAN_IF = .*/define LAN_IF = \"$LAN_G\"/" \
      -e "s/^define WAN_IF = .*/define WAN_IF = \"$WAN_G\"/" \
      -e "s/^define DNS_PORT = .*/define DNS_PORT = $DNS_PORT/" \
      -e "s/^define PROXY_PORT = .*/define PROXY_PORT = $PROXY_PORT/" \
      "$HERE/nftables.conf"
}

up() {
  command -v nft >/dev/null || { echo "lab.sh: nftables (nft) is missing" >&2; exit 1; }
  down
  ip netns add "$NS_C"; ip netns add "$NS_G"; ip netns add "$NS_S"
  ip link add "$LAN_C" netns "$NS_C" type veth peer name "$LAN_G" netns "$NS_G"
  ip link add "$WAN_G" netns "$NS_G" type veth peer name "$WAN_S" netns "$NS_S"
  ip -n "$NS_C" addr add "$CLIENT_IP/24" dev "$LAN_C"
  ip -n "$NS_G" addr add "$GW_LAN_IP/24" dev "$LAN_G"
  ip -n "$NS_G" addr add "$GW_WAN_IP/24" dev "$WAN_G"
  ip -n "$NS_S" addr add "$SERVER_IP/24" dev "$WAN_S"
  local ns
  for ns in "$NS_C" "$NS_G" "$NS_S"; do ip -n "$ns" link set lo up; done
  ip -n "$NS_C" link set "$LAN_C" up
  ip -n "$NS_G" link set "$LAN_G" up
  ip -n "$NS_G" link set "$WAN_G" up
  ip -n "$NS_S" link set "$WAN_S" up
  ip -n "$NS_C" route add default via "$GW_LAN_IP"
  ip -n "$NS_S" route add default via "$GW_WAN_IP"
  ip netns exec "$NS_G" sysctl -qw net.ipv4.ip_forward=1
  nft_rules | ip netns exec "$NS_G" nft -f -
  echo "lab $P up: client $CLIENT_IP ($NS_C), gateway $GW_LAN_IP/$GW_WAN_IP ($NS_G), server $SERVER_IP ($NS_S)"
}

status() {
  local ns
  for ns in "$NS_C" "$NS_G" "$NS_S"; do
    echo "== $ns"; ip -n "$ns" -brief addr 2>/dev/null || echo "(absent)"
  done
  ip netns exec "$NS_G" nft list table inet linewarden 2>/dev/null || true
}

case "${1:-}" in
  up) need_root; up ;;
  down) need_root; down ;;
  status) need_root; status ;;
  nft) nft_rules ;;
  *) echo "usage: deploy/lab.sh up|down|status|nft   (env LW_LAB, LW_DNS_PORT, LW_PROXY_PORT)" >&2; exit 2 ;;
esac
