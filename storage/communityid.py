"""Community ID v1 flow hash (https://github.com/corelight/community-id-spec).

Zeek and Suricata compute the same string for a flow, so our records join with
theirs. The store also uses it to save space: a record whose ``community_id`` is
exactly the hash of its own 5-tuple stores a 0-byte marker and recomputes it on read.
Pure function: no I/O.
"""

from __future__ import annotations

import binascii
import hashlib
import socket
import struct

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
_H = struct.Struct("!H").pack
_BBHH = struct.Struct("!BBHH").pack


_packed_cache: dict[str, bytes] = {}


def _packed(ip: str) -> bytes:
    p = _packed_cache.get(ip)
    if p is None:
        try:
            p = socket.inet_pton(socket.AF_INET, ip)
        except OSError:
            p = socket.inet_pton(socket.AF_INET6, ip)
        if len(_packed_cache) > 100_000:  # bounded
            _packed_cache.clear()
        _packed_cache[ip] = p
    return p


def community_id(proto: int | str, saddr: str, sport: int, daddr: str, dport: int, seed: int = 0) -> str:
    """``1:`` + base64(SHA-1(seed, addresses, proto, pad, ports)), endpoints ordered as the
    spec says (the smaller address, or the smaller port on equal addresses, goes first).
    Raises ValueError for an unknown protocol name or an address that is not an IP."""
    p = PROTO_NUMBERS[proto] if isinstance(proto, str) else proto
    try:
        a, b = _packed(saddr), _packed(daddr)
    except (OSError, TypeError) as exc:
        raise ValueError(f"not an IP address: {saddr!r} / {daddr!r}") from exc
    if (a, sport) > (b, dport):
        a, b, sport, dport = b, a, dport, sport
    data = _H(seed) + a + b + _BBHH(p, 0, sport, dport)
    return "1:" + binascii.b2a_base64(hashlib.sha1(data).digest(), newline=False).decode()
