"""Community ID v1 flow hashes, as Zeek and Suricata compute them.

Owns: the hash of https://github.com/corelight/community-id-spec (version 1):
``"1:" + base64(sha1(seed ‖ addr_lo ‖ addr_hi ‖ proto ‖ 0 ‖ port_lo ‖ port_hi))``,
where the endpoint pairs are ordered so both directions of a flow give the same
ID. Seed, ports and proto are in network byte order. ICMP type/code are mapped
to "ports" as the spec says; protocols without ports hash addresses and proto only.
Must not: know about records or the flow table.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct

PORTED = frozenset({6, 17, 132})
"""TCP, UDP, SCTP: the protocols whose ports enter the hash."""

# ICMP type → counterpart type, for the request/reply pairs the spec lists;
# a one-way type (no counterpart) keeps the given order.
_ICMP4 = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17, 10: 9, 9: 10}
_ICMP6 = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135, 130: 131, 131: 130, 144: 145, 145: 144}


def _packed(addr: str | bytes) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise ValueError(f"packed address of {len(addr)} bytes")
        return addr
    return ipaddress.ip_address(addr).packed


def community_id(
    proto: int,
    src: str | bytes,
    dst: str | bytes,
    sport: int = 0,
    dport: int = 0,
    *,
    seed: int = 0,
) -> str:
    """The Community ID v1 of a flow; ``src``/``dst`` as text or packed bytes.

    For ICMP (1) and ICMPv6 (58) pass the type as ``sport`` and the code as ``dport``.
    """
    a, b = _packed(src), _packed(dst)
    if len(a) != len(b):
        raise ValueError("source and destination must be the same IP version")
    one_way = False
    if proto in (1, 58):
        pairs = _ICMP4 if proto == 1 else _ICMP6
        icmp_type, code = sport, dport
        if icmp_type in pairs:
            sport, dport = icmp_type, pairs[icmp_type]
        else:
            sport, dport, one_way = icmp_type, code, True
    ports = proto in PORTED or proto in (1, 58)
    if not one_way and (a, sport) > (b, dport):
        a, b, sport, dport = b, a, dport, sport
    data = struct.pack("!H", seed) + a + b + struct.pack("!BB", proto, 0)
    if ports:
        data += struct.pack("!HH", sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")
