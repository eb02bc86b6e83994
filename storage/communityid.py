"""Community ID v1 flow hash (https://github.com/corelight/community-id-spec).

``"1:" + base64(sha1(seed ‖ addr_lo ‖ addr_hi ‖ proto ‖ 0 ‖ port_lo ‖ port_hi))``,
the endpoint pairs ordered so both directions of a flow give the same ID; seed,
ports and proto in network byte order. ICMP type/code stand in for ports as the
spec says; protocols without ports hash addresses and proto only.

Zeek and Suricata compute the same string for a flow, so our records join with
theirs. The one implementation: adapters (proxy/) fill the field with it, and the
store uses it to save space (a record whose ``community_id`` is exactly the hash of
its own 5-tuple stores a 0-byte marker and recomputes it on read). Pure: no I/O.
"""

from __future__ import annotations

import binascii
import hashlib
import socket
import struct

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmp6": 58}
PORTED = frozenset({6, 17, 132})
"""TCP, UDP, SCTP: the protocols whose ports enter the hash."""

# ICMP type → counterpart type, for the request/reply pairs the spec lists; a
# one-way type (no counterpart) keeps the given order.
_ICMP4 = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17, 10: 9, 9: 10}
_ICMP6 = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135, 130: 131, 131: 130,
          144: 145, 145: 144}

_H = struct.Struct("!H").pack
_BB = struct.Struct("!BB").pack
_HH = struct.Struct("!HH").pack
_FLOW = {4: struct.Struct("!H4s4sBBHH").pack, 16: struct.Struct("!H16s16sBBHH").pack}
"""Seed, both addresses, proto, padding and both ports in one pack: the store checks the
ID of nearly every record it writes, so the common (ported) case is one call, not five."""

PACKED_CACHE_MAX = 100_000
"""Addresses whose packed form is kept: the store hashes every record, and the
same few thousand LAN and server addresses recur; cleared when full."""

_packed_cache: dict[str, bytes] = {}


def _packed(ip: str | bytes) -> bytes:
    if isinstance(ip, bytes):
        if len(ip) not in (4, 16):
            raise ValueError(f"packed address of {len(ip)} bytes")
        return ip
    p = _packed_cache.get(ip)
    if p is None:
        try:
            p = socket.inet_pton(socket.AF_INET, ip)
        except OSError:
            p = socket.inet_pton(socket.AF_INET6, ip)
        if len(_packed_cache) > PACKED_CACHE_MAX:
            _packed_cache.clear()
        _packed_cache[ip] = p
    return p


def community_id(
    proto: int | str, saddr: str | bytes, sport: int, daddr: str | bytes, dport: int, seed: int = 0
) -> str:
    """The Community ID v1 of a flow; addresses as text or packed bytes.

    For ICMP (1) and ICMPv6 (58) pass the type as ``sport`` and the code as ``dport``.
    Raises ValueError for an unknown protocol name, an address that is not an IP, or
    addresses of different IP versions.
    """
    p = PROTO_NUMBERS[proto] if isinstance(proto, str) else proto
    try:
        a = _packed_cache.get(saddr) or _packed(saddr)  # type: ignore[arg-type]
        b = _packed_cache.get(daddr) or _packed(daddr)  # type: ignore[arg-type]
    except (OSError, TypeError) as exc:
        raise ValueError(f"not an IP address: {saddr!r} / {daddr!r}") from exc
    if len(a) != len(b):
        raise ValueError("source and destination must be the same IP version")
    if p in PORTED:
        if (a, sport) > (b, dport):
            a, b, sport, dport = b, a, dport, sport
        data = _FLOW[len(a)](seed, a, b, p, 0, sport, dport)
        return "1:" + binascii.b2a_base64(hashlib.sha1(data).digest(), newline=False).decode()
    one_way = False
    if p in (1, 58):
        pairs = _ICMP4 if p == 1 else _ICMP6
        icmp_type, code = sport, dport
        if icmp_type in pairs:
            sport, dport = icmp_type, pairs[icmp_type]
        else:
            sport, dport, one_way = icmp_type, code, True
    if not one_way and (a, sport) > (b, dport):
        a, b, sport, dport = b, a, dport, sport
    data = _H(seed) + a + b + _BB(p, 0)
    if p in (1, 58):
        data += _HH(sport, dport)
    return "1:" + binascii.b2a_base64(hashlib.sha1(data).digest(), newline=False).decode()
