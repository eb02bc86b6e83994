"""The DNS shim's fast path: the few byte-level operations done per packet.

Owns: a small hand-written parser for the header and the question of a query
(``parse_query``), a walker over upstream responses that finds what the cache
and the audit record need without building objects (``walk_response``), the
rendering of a cached answer for one client (``render``: id rewritten, TTLs
decremented, the client's question bytes and EDNS0 record put back) and the
builders of the shim's own short answers (FORMERR, SERVFAIL, NXDOMAIN,
sinkhole, truncated). Must not: decide what is blocked (the Engine does), read
the clock (callers pass ``now``), touch sockets or storage.

Why it exists: issue 5 measured a plain asyncio + uvloop forwarder that parses
and builds every packet with dnslib at 4.9k queries/s on the 2-core test
machine. Parsing only the 12-byte header and the question, and answering hits
from stored wire bytes, costs a few microseconds per packet
(benchmarks/bench_dns.py measures the whole shim against dnsmasq and unbound).
dnslib (the project's one DNS library) stays the parser for everything
unusual: unknown record types in answers, HTTPS/SVCB rewriting (``strip_ech``)
and queries this parser declines (``Decline``).

Strategy of ``render``: a cached response is stored without its OPT record
(RFC 6891 6.1.1: the OPT RR belongs to the hop, not to the data) together with
the byte offsets of every TTL field. For each whole second of age the TTLs are
rewritten once and the result is memoised, so a hit in the common case is one
bytes concatenation: the client's id + the memoised body (+ our OPT record).
"""

from __future__ import annotations

import re
import socket
import struct
from typing import NamedTuple

HEADER = struct.Struct("!HHHHHH")
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
RR_FIXED = struct.Struct("!HHIH")
"""type, class, ttl, rdlength: the fixed part after an RR's owner name."""

MAX_NAME_WIRE = 255
"""RFC 1035 2.3.4: a name is at most 255 octets on the wire."""
MAX_LABEL = 63
"""RFC 1035 2.3.4: a label is at most 63 octets; 0x40 and 0x80 prefixes are not labels."""
MAX_POINTER_HOPS = 64
"""A name of 255 octets has at most 127 labels; more pointer hops than this means a
loop (pointers are also required to point strictly backwards, RFC 1035 4.1.4)."""
MAX_CNAME_CHAIN = 16
"""CNAME targets kept per answer for the chain check; resolvers stop far earlier."""

NO_EDNS_UDP_SIZE = 512
"""RFC 1035 4.2.1: a UDP answer to a client without EDNS0 is at most 512 octets."""
MAX_UDP_SIZE = 4096
"""Upper clamp on a client's advertised EDNS0 buffer size (RFC 6891 6.2.5 suggests 4096)."""
OUR_EDNS_SIZE = 1232
"""Buffer size we advertise: DNS Flag Day 2020's value, avoids IP fragmentation."""

QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
CD = 0x0010

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED", 6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH",
               10: "NOTZONE", 16: "BADVERS"}

T_A, T_NS, T_CNAME, T_SOA, T_PTR, T_MX, T_TXT, T_AAAA = 1, 2, 5, 6, 12, 15, 16, 28
T_DNAME, T_OPT, T_SVCB, T_HTTPS = 39, 41, 64, 65
QTYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
               28: "AAAA", 33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS",
               46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 50: "NSEC3", 52: "TLSA", 64: "SVCB",
               65: "HTTPS", 99: "SPF", 251: "IXFR", 252: "AXFR", 255: "ANY", 257: "CAA"}
CLASS_IN = 1

_PRINTABLE = frozenset(range(0x21, 0x7F)) - {0x2E, 0x5C}
"""Label octets shown as themselves; others use RFC 4343 ``\\DDD`` escapes."""
_ODD = re.compile(rb"[^\x21-\x2d\x2f-\x5b\x5d-\x7e]")
"""Any octet outside ``_PRINTABLE``: the rare names that need escaping."""


class FormatError(ValueError):
    """The packet is not a well-formed DNS message (the sender's fault)."""


class Decline(Exception):
    """A well-formed query the fast path does not handle; the slow path (dnslib) does."""


class Query(NamedTuple):
    """A query as the fast path sees it (a NamedTuple: built once per packet, cheaply)."""

    id: int
    flags: int
    qname: str
    """Dotted, no trailing dot, case as sent, ``\\DDD`` escapes for odd octets; ``""`` is the root."""
    qtype: int
    qclass: int
    key: bytes
    """Cache key: lower-cased question wire bytes + one byte of EDNS state (has-OPT, DO)."""
    qend: int
    """Offset just past the question."""
    edns: bool
    do: bool
    udp_size: int
    """Largest UDP answer this client accepts."""


QUERY_MEMO_MAX = 65_536
"""Distinct query shapes (everything but the id) remembered by ``parse_query``.
Clients repeat the same questions with new ids; a dict hit costs a fraction of
a parse. Cleared when full (~100 bytes an entry: a few MB at most)."""
_query_memo: dict[bytes, tuple] = {}


def parse_query(data: bytes) -> Query:
    """Parse header and question of a client query.

    Raises ``FormatError`` for malformed packets, ``Decline`` for well-formed ones
    that need the slow path (opcode other than QUERY, several questions, records
    in answer/authority, additional records other than one plain OPT).
    """
    shape = data[2:]
    hit = _query_memo.get(shape)
    if hit is not None:
        return Query((data[0] << 8) | data[1], *hit)
    q = _parse_query(data)
    if len(_query_memo) >= QUERY_MEMO_MAX:
        _query_memo.clear()
    _query_memo[shape] = tuple(q)[1:]
    return q


def _parse_query(data: bytes) -> Query:
    n = len(data)
    if n < 12:
        raise FormatError("shorter than a DNS header")
    id_, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & QR:
        raise FormatError("QR set: a response, not a query")
    if flags & 0x7800 or qd != 1 or an or ns or ar > 1:
        raise Decline("opcode/counts need the slow path")
    pos = 12
    while True:
        if pos >= n:
            raise FormatError("question name runs past the end")
        ln = data[pos]
        if ln == 0:
            pos += 1
            break
        if ln > MAX_LABEL:
            # In the first name of a message a pointer can only point into the header.
            raise FormatError("bad label length or pointer in question")
        pos += 1 + ln
        if pos - 12 > MAX_NAME_WIRE - 1:
            raise FormatError("question name longer than 255 octets")
    qend = pos + 4
    if qend > n:
        raise FormatError("question truncated before qtype/qclass")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    qname = wire_name_text(data, 12, pos - 1)
    edns = do = False
    udp_size = NO_EDNS_UDP_SIZE
    if ar:
        # The one additional record must be a root-owned OPT (RFC 6891 6.1.1).
        if qend + 11 > n or data[qend] != 0:
            raise Decline("additional record is not a plain OPT")
        rtype, size, ttl, rdlen = RR_FIXED.unpack_from(data, qend + 1)
        if rtype != T_OPT or qend + 11 + rdlen != n:
            raise Decline("additional record is not a plain OPT")
        if ttl & 0x00FF0000:
            raise Decline("EDNS version other than 0 (BADVERS is answered by the slow path)")
        edns = True
        do = bool(ttl & 0x8000)
        udp_size = min(max(size, NO_EDNS_UDP_SIZE), MAX_UDP_SIZE)
    elif qend != n:
        raise FormatError("trailing bytes after the question")
    key = data[12:qend].lower() + (b"\x03" if do else b"\x01" if edns else b"\x00")
    return Query(id_, flags, qname, qtype, qclass, key, qend, edns, do, udp_size)


def wire_name_text(data: bytes, start: int, end: int) -> str:
    """Text form of uncompressed labels in ``data[start:end]`` (no final zero octet)."""
    labels: list[bytes] = []
    pos = start
    while pos < end:
        ln = data[pos]
        labels.append(data[pos + 1: pos + 1 + ln])
        pos += 1 + ln
    flat = b"".join(labels)
    if not _ODD.search(flat):
        return b".".join(labels).decode("ascii")
    return ".".join(_label_text(label) for label in labels)


def _label_text(label: bytes) -> str:
    return "".join(chr(b) if b in _PRINTABLE else f"\\{b:03d}" for b in label)


def read_name(data: bytes, pos: int) -> tuple[str, int]:
    """Decode a possibly compressed name at ``pos``; return (text, offset after it).

    Pointers must point strictly backwards and hops are bounded, so loops and
    forward pointers (RFC 1035 4.1.4) are ``FormatError``s, never hangs.
    """
    parts: list[str] = []
    after = -1
    hops = 0
    total = 0
    n = len(data)
    limit = pos
    while True:
        if pos >= n:
            raise FormatError("name runs past the end")
        ln = data[pos]
        if ln == 0:
            if after < 0:
                after = pos + 1
            return ".".join(parts), after
        kind = ln & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                raise FormatError("pointer truncated")
            target = ((ln & 0x3F) << 8) | data[pos + 1]
            if after < 0:
                after = pos + 2
            if target >= limit:
                raise FormatError("compression pointer does not point backwards")
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise FormatError("compression pointer loop")
            pos = limit = target
            continue
        if kind:
            raise FormatError("reserved label type")
        end = pos + 1 + ln
        if end > n:
            raise FormatError("label runs past the end")
        total += ln + 1
        if total > MAX_NAME_WIRE - 1:
            raise FormatError("name longer than 255 octets")
        label = data[pos + 1:end]
        parts.append(_label_text(label) if _ODD.search(label) else label.decode("ascii"))
        pos = end


def skip_name(data: bytes, pos: int) -> int:
    """Offset just after the name at ``pos`` (its own bytes; pointers are not followed)."""
    n = len(data)
    start = pos
    while True:
        if pos >= n:
            raise FormatError("name runs past the end")
        ln = data[pos]
        if ln == 0:
            return pos + 1
        if ln & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise FormatError("pointer truncated")
            return pos + 2
        if ln & 0xC0:
            raise FormatError("reserved label type")
        pos += 1 + ln
        if pos - start > MAX_NAME_WIRE:
            raise FormatError("name longer than 255 octets")


class ResponseInfo(NamedTuple):
    """What the shim needs from an upstream response, found in one walk."""

    id: int
    flags: int
    rcode: int
    """Full rcode (the OPT record's extended bits included)."""
    qend: int
    ttl_offsets: tuple[int, ...]
    """Offsets of every TTL field except the OPT record's (offsets in the OPT-less body)."""
    body: bytes
    """The response without its OPT record, ARCOUNT adjusted."""
    answers: list[str]
    """Answer-section data as text; empty when ``needs_dnslib``."""
    cnames: list[str]
    """CNAME targets in the answer section, in order."""
    ttl: int | None
    """Cache lifetime: min answer TTL, or the RFC 2308 negative TTL; None: do not cache."""
    has_svcb: bool
    """An SVCB/HTTPS record is present (ECH stripping goes through dnslib)."""
    needs_dnslib: bool
    """Some answer type has no fast text form; ``answers`` must come from dnslib."""


def walk_response(data: bytes) -> ResponseInfo:
    """Walk an upstream response once. Raises ``FormatError`` when it is malformed."""
    n = len(data)
    if n < 12:
        raise FormatError("shorter than a DNS header")
    id_, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if not flags & QR:
        raise FormatError("QR clear: not a response")
    pos = 12
    for _ in range(qd):
        pos = skip_name(data, pos) + 4
        if pos > n:
            raise FormatError("question truncated")
    qend = pos
    ttl_offsets: list[int] = []
    answers: list[str] = []
    cnames: list[str] = []
    min_ans: int | None = None
    soa_neg: int | None = None
    has_svcb = needs_dnslib = False
    opt_start = opt_end = -1
    ext_rcode = 0
    total = an + ns + ar
    for i in range(total):
        start = pos
        pos = skip_name(data, pos)
        if pos + 10 > n:
            raise FormatError("resource record truncated")
        rtype, _rclass, ttl, rdlen = RR_FIXED.unpack_from(data, pos)
        rdata = pos + 10
        end = rdata + rdlen
        if end > n:
            raise FormatError("rdata runs past the end")
        if rtype == T_OPT and i >= an + ns:
            if opt_start >= 0:
                raise FormatError("more than one OPT record")
            opt_start, opt_end = start, end
            ext_rcode = ttl >> 24
        else:
            ttl_offsets.append(pos + 4)
            if rtype in (T_SVCB, T_HTTPS):
                has_svcb = True
            if i < an:
                min_ans = ttl if min_ans is None else min(min_ans, ttl)
                if rtype == T_A and rdlen == 4:
                    answers.append(socket.inet_ntop(socket.AF_INET, data[rdata:end]))
                elif rtype == T_AAAA and rdlen == 16:
                    answers.append(socket.inet_ntop(socket.AF_INET6, data[rdata:end]))
                elif rtype == T_CNAME:
                    target = read_name(data, rdata)[0]
                    answers.append(target)
                    if len(cnames) < MAX_CNAME_CHAIN:
                        cnames.append(target)
                else:
                    needs_dnslib = True
            elif i < an + ns and rtype == T_SOA and rdlen >= 20:
                # RFC 2308 5: negative TTL = min(SOA TTL, SOA MINIMUM field).
                minimum = U32.unpack_from(data, end - 4)[0]
                soa_neg = min(ttl, minimum) if soa_neg is None else min(soa_neg, ttl, minimum)
        pos = end
    if pos != n:
        raise FormatError("trailing bytes after the last record")
    rcode = (ext_rcode << 4) | (flags & 0x000F)
    if opt_start >= 0:
        # Cut the OPT record out; offsets past it move back by its length.
        cut = opt_end - opt_start
        body = bytearray(data[:opt_start] + data[opt_end:])
        U16.pack_into(body, 10, ar - 1)
        ttl_offsets = [o - cut if o > opt_start else o for o in ttl_offsets]
        body = bytes(body)
    else:
        body = bytes(data)
    if rcode == NOERROR and an:
        cache_ttl = min_ans
    elif rcode in (NOERROR, NXDOMAIN):
        cache_ttl = soa_neg  # None without an SOA: RFC 2308 5 says do not cache
    else:
        cache_ttl = None
    return ResponseInfo(id_, flags, rcode, qend, tuple(ttl_offsets), body, answers, cnames,
                        cache_ttl, has_svcb, needs_dnslib)


def opt_record(do: bool, ext_rcode: int = 0) -> bytes:
    """Our own OPT pseudo-record (RFC 6891 6.1.2): root owner, our buffer size, no options."""
    return b"\x00\x00\x29" + struct.pack("!HBBHH", OUR_EDNS_SIZE, ext_rcode, 0,
                                         0x8000 if do else 0, 0)


def with_edns(body: bytes | bytearray, q: Query, ext_rcode: int = 0) -> bytes:
    """Append our OPT record when the client used EDNS0 (and only then: RFC 6891 7)."""
    if not q.edns:
        return bytes(body)
    out = bytearray(body)
    U16.pack_into(out, 10, U16.unpack_from(out, 10)[0] + 1)
    return bytes(out + opt_record(q.do, ext_rcode))


def header_only(data: bytes, rcode: int) -> bytes | None:
    """A question-less answer with ``rcode`` for a packet whose question cannot be used.

    Used for FORMERR (RFC 1035 4.1.1) and NOTIMP. None when even the header is
    missing or the packet is itself a response: such packets are dropped, as
    answering a response invites reflection loops.
    """
    if len(data) < 12:
        return None
    id_, flags = struct.unpack_from("!HH", data)
    if flags & QR:
        return None
    return HEADER.pack(id_, QR | (flags & 0x7800) | (flags & RD) | RA | rcode, 0, 0, 0, 0)


def answer_header(q: Query, rcode: int, an: int, extra_flags: int = 0) -> bytes:
    return HEADER.pack(q.id, QR | RA | (q.flags & (RD | CD)) | extra_flags | rcode, 1, an, 0, 0)


def build_rcode(data: bytes, q: Query, rcode: int, extra_flags: int = 0) -> bytes:
    """An answer with the client's question, no records, and ``rcode`` (SERVFAIL, NXDOMAIN...)."""
    return with_edns(answer_header(q, rcode, 0, extra_flags) + data[12:q.qend], q)


def build_truncated(data: bytes, q: Query) -> bytes:
    """TC set, question only: the client retries over TCP (RFC 7766 5)."""
    return build_rcode(data, q, NOERROR, TC)


def build_sinkhole(data: bytes, q: Query, address: bytes | None, ttl: int) -> bytes:
    """A synthetic answer: one A/AAAA record for ``address`` (packed), or NODATA when None."""
    if address is None:
        return build_rcode(data, q, NOERROR)
    rtype = T_A if len(address) == 4 else T_AAAA
    rr = b"\xc0\x0c" + RR_FIXED.pack(rtype, CLASS_IN, ttl, len(address)) + address
    return with_edns(answer_header(q, NOERROR, 1) + data[12:q.qend] + rr, q)


class CachedWire:
    """A stored upstream response, ready to be rendered for any client.

    ``render`` memoises the TTL-adjusted body per whole second of age, so
    most hits cost one concatenation.
    """

    __slots__ = ("body", "ttl_offsets", "ttls", "stored", "qend", "rd_cd", "_age", "_aged")

    def __init__(self, info: ResponseInfo, now: float, lifetime: int | None = None) -> None:
        """``lifetime``: how long the cache keeps it; no TTL served exceeds it, so a
        client never caches longer than we do (RFC 2308 5: the SOA of a negative
        answer carries the negative TTL; ``cache_max_ttl`` caps what clients see)."""
        self.body = info.body
        self.ttl_offsets = info.ttl_offsets
        ttls = [U32.unpack_from(info.body, o)[0] for o in info.ttl_offsets]
        if lifetime is not None and any(t > lifetime for t in ttls):
            ttls = [min(t, lifetime) for t in ttls]
            body = bytearray(info.body)
            for off, t in zip(info.ttl_offsets, ttls):
                U32.pack_into(body, off, t)
            self.body = bytes(body)
        self.ttls = tuple(ttls)
        self.stored = now
        self.qend = info.qend
        self.rd_cd = info.flags & (RD | CD)
        self._age = 0
        self._aged = self.body

    def aged_body(self, now: float) -> bytes:
        age = int(now - self.stored)
        if age != self._age:
            out = bytearray(self.body)
            for off, ttl in zip(self.ttl_offsets, self.ttls):
                U32.pack_into(out, off, ttl - age if ttl > age else 0)
            self._aged = bytes(out)
            self._age = age
        return self._aged

    def render(self, data: bytes, q: Query, now: float) -> bytes:
        """The answer for client query ``data``: its id, flags and question case."""
        body = self.aged_body(now)
        if q.qend == self.qend and (q.flags & (RD | CD)) == self.rd_cd and data[12:q.qend] == body[12:q.qend]:
            out = data[:2] + body[2:]
        else:
            buf = bytearray(body)
            buf[0:2] = data[:2]
            flags = (U16.unpack_from(buf, 2)[0] & ~(RD | CD)) | (q.flags & (RD | CD))
            U16.pack_into(buf, 2, flags)
            # Same length when the keys matched: put back the client's 0x20 case.
            buf[12:q.qend] = data[12:q.qend]
            out = bytes(buf)
        if q.edns:
            out = with_edns(out, q)
        return out


def record_text(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def rcode_text(rcode: int | None) -> str | None:
    if rcode is None:
        return None
    return RCODE_NAMES.get(rcode) or f"RCODE{rcode}"
