"""Where a redirected connection was really going (transparent mode).

Owns: reading the pre-NAT destination of a TCP connection that nftables
redirected to the proxy (``redirect`` / ``dnat``), through netfilter's
``SO_ORIGINAL_DST`` (IPv4, ``<linux/netfilter_ipv4.h>``) and
``IP6T_SO_ORIGINAL_DST`` (IPv6, ``<linux/netfilter_ipv6/ip6_tables.h>``);
both are option 80, at levels SOL_IP and SOL_IPV6.

Must not: guess. When conntrack has no entry (the connection was not
redirected, e.g. someone connected to the proxy port directly) it raises
``OSError`` and the caller refuses the connection: proxying to ourselves
would loop.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_SOCKADDR_IN6_LEN = 28


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """Decode a ``struct sockaddr_in`` / ``sockaddr_in6`` as the kernel returns it."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr too short ({len(raw)} bytes)")
    family = struct.unpack_from("=H", raw, 0)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        if len(raw) < 24:
            raise ValueError("sockaddr_in6 too short")
        addr = ipaddress.IPv6Address(raw[8:24])
        # A v4-mapped destination seen on a dual-stack socket is an IPv4 destination.
        return (str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)), port
    raise ValueError(f"unknown address family {family}")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The (ip, port) the client connected to before the redirect; ``OSError`` if none."""
    if sock.family == socket.AF_INET6:
        try:
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
            return parse_sockaddr(raw)
        except OSError:
            # An IPv4 client on a dual-stack listener is tracked by the IPv4 table.
            pass
    raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
    return parse_sockaddr(raw)
