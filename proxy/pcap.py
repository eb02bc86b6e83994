"""Capture reader for ``linewarden replay``: pcap and pcapng files → decoded packets.

Owns: the two file formats (libpcap: both byte orders, microsecond and nanosecond
magic; pcapng: SHB/IDB/EPB/SPB/PB blocks, either byte order, per-interface
``if_tsresol``/``if_tsoffset``), the link layers linewarden meets on a gateway
(Ethernet with 802.1Q/802.1ad/QinQ tags, Linux cooked SLL and SLL2, raw IP as
linktypes 101, 228 and 229) and IPv4/IPv6 down to TCP and UDP.
Must not: reassemble TCP (proxy/reassembly.py), parse application protocols, or
decide anything (that is the Engine's job).

Strategy. The reader is our own ``struct`` code rather than dpkt: dpkt builds one
Python object per layer per packet, and we only need eleven fields, so
``struct.unpack_from`` at fixed offsets on one buffer is several times faster
(``benchmarks/bench_replay.py --compare-readers`` measures both). A classic pcap
file, the format of nearly every capture, is read by one loop
(``_pcap_packets``) that walks the records of a 4 MiB block by offset and
decodes the common case (Ethernet, IPv4 without options or fragments, TCP or
UDP) in place: no per-record ``Frame``, no copy of the frame, only the payload
sliced out; every other record goes through the general ``decode``. Files of any
size are read in constant memory. pcapng goes through ``read_frames``/``decode``.

Errors. A damaged file (bad magic, truncated record, absurd record length, unknown
linktype) raises ``CaptureError`` *at the point of damage*: every packet before it
has already been yielded, so the caller keeps the decisions made so far (STYLE.md 5).
Damage inside one packet (a truncated IP header, a bad TCP data offset) never
raises: the packet is counted in ``CaptureStats`` and skipped.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from rules.errors import LinewardenError

MAX_RECORD_BYTES = 1 << 20
"""Largest captured length of one packet record we accept. libpcap's own
MAXIMUM_SNAPLEN is 262144 and Wireshark refuses records above the same figure;
four times that leaves room for jumbo/TSO captures. Anything larger is a damaged
header (``bad/pcap/caplen_huge.pcap`` claims 2 GiB), and reading it would
allocate that much memory."""

MAX_BLOCK_BYTES = 16 << 20
"""Largest pcapng block we accept (a block holds at most one packet plus options;
the same reasoning as ``MAX_RECORD_BYTES``, with room for big option blocks)."""

READ_CHUNK = 4 << 20
"""Bytes read from the file at a time: large enough that per-read overhead
vanishes, small enough to keep memory constant."""

LINKTYPE_NAMES: dict[int, str] = {
    0: "BSD loopback",
    1: "Ethernet",
    101: "raw IP",
    105: "IEEE 802.11",
    113: "Linux cooked (SLL)",
    127: "IEEE 802.11 radiotap",
    228: "raw IPv4",
    229: "raw IPv6",
    276: "Linux cooked v2 (SLL2)",
}

# Linktypes we decode (LINKTYPE_* numbers of the tcpdump.org registry; 12 and 14
# are the DLT_RAW values old libpcap versions wrote into files instead of 101).
ETHERNET, RAW, SLL, RAW4, RAW6, SLL2 = 1, 101, 113, 228, 229, 276
SUPPORTED_LINKTYPES = frozenset({ETHERNET, RAW, 12, 14, SLL, RAW4, RAW6, SLL2})

ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
"""802.1Q, 802.1ad (QinQ outer) and the pre-standard QinQ tag types."""

IPPROTO_TCP, IPPROTO_UDP = 6, 17
IPV6_EXT_HEADERS = frozenset({0, 43, 60, 135, 139, 140})
"""Hop-by-hop, routing, destination options, mobility, HIP, shim6: skipped over.
Fragment (44) is handled apart; AH (51) uses 4-byte units."""

TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

PCAP_MAGICS: dict[bytes, tuple[str, bool]] = {
    # magic as stored → (struct byte order, timestamps in nanoseconds)
    b"\xd4\xc3\xb2\xa1": ("<", False),
    b"\xa1\xb2\xc3\xd4": (">", False),
    b"\x4d\x3c\xb2\xa1": ("<", True),
    b"\xa1\xb2\x3c\x4d": (">", True),
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"


class CaptureError(LinewardenError):
    """The capture file itself is damaged or of a kind we cannot read."""

    def __init__(self, reason: str, offset: int | None = None) -> None:
        self.reason = reason
        self.offset = offset
        at = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"capture: {reason}{at}")


class Packet(NamedTuple):
    """One TCP or UDP packet, decoded down to its transport payload.

    A NamedTuple rather than a dataclass: hundreds of thousands are built per
    second, and tuple construction is the cheapest immutable record Python has.
    """

    ts: int
    """Capture time, microseconds since the epoch, UTC."""
    src: bytes
    """Source address, packed (4 or 16 bytes)."""
    dst: bytes
    """Destination address, packed."""
    proto: int
    """6 (TCP) or 17 (UDP)."""
    sport: int
    dport: int
    flags: int
    """TCP flags (``TH_*``); 0 for UDP."""
    seq: int
    """TCP sequence number; 0 for UDP."""
    ack: int
    """TCP acknowledgement number; 0 for UDP."""
    payload: bytes
    """Transport payload (trimmed to the IP length: Ethernet padding removed)."""
    mac: bytes | None = None
    """Source MAC address when the link layer has one."""


@dataclass(slots=True)
class CaptureStats:
    """What the reader saw; printed in the replay summary."""

    records: int = 0
    """Packet records read from the file."""
    bytes: int = 0
    """Captured bytes of those records."""
    packets: int = 0
    """Records decoded into a TCP or UDP ``Packet``."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Records not decoded, by reason (``not-ip``, ``fragment``, ``truncated-tcp``...)."""
    warnings: dict[str, int] = field(default_factory=dict)
    """Oddities that did not stop decoding (``caplen>len``...)."""

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def warn(self, reason: str) -> None:
        self.warnings[reason] = self.warnings.get(reason, 0) + 1


class Frame(NamedTuple):
    """One raw record of the file."""

    ts: int
    """Microseconds since the epoch, UTC."""
    linktype: int
    data: bytes
    orig_len: int


def ip_text(addr: bytes) -> str:
    """Packed address → its text form (RFC 5952 for IPv6)."""
    return socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)


def linktype_name(linktype: int) -> str:
    return f"{linktype} ({LINKTYPE_NAMES[linktype]})" if linktype in LINKTYPE_NAMES else str(linktype)


# ---------------------------------------------------------------------------
# File formats


class _Window:
    """A sliding read window over a binary file: ``need(n)`` makes ``n`` bytes
    available at ``pos`` or reports how many there were."""

    __slots__ = ("f", "buf", "pos", "base", "eof")

    def __init__(self, f: BinaryIO, head: bytes) -> None:
        self.f = f
        self.buf = head
        self.pos = 0
        self.base = 0  # file offset of buf[0]
        self.eof = False

    def need(self, n: int) -> bool:
        if len(self.buf) - self.pos >= n:
            return True
        if self.eof:
            return False
        rest = self.buf[self.pos :]
        self.base += self.pos
        self.pos = 0
        parts = [rest]
        have = len(rest)
        while have < n or have < READ_CHUNK // 2:
            chunk = self.f.read(max(READ_CHUNK, n - have))
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
            have += len(chunk)
        self.buf = b"".join(parts)
        return len(self.buf) >= n

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def at_end(self) -> bool:
        return not self.need(1)


def read_frames(f: BinaryIO, stats: CaptureStats | None = None) -> Iterator[Frame]:
    """Every record of a pcap or pcapng file, in file order.

    Raises ``CaptureError`` where the file is damaged, after yielding every
    record before the damage.
    """
    stats = stats if stats is not None else CaptureStats()
    head = _file_head(f)
    magic = head[:4]
    if magic in PCAP_MAGICS:
        yield from _read_pcap(_Window(f, head), stats)
    else:
        yield from _read_pcapng(_Window(f, head), stats)


def _file_head(f: BinaryIO) -> bytes:
    """The first 24 bytes, once they are known to start a pcap or pcapng file."""
    head = f.read(24)
    if not head:
        raise CaptureError("empty file (no capture header)", 0)
    magic = head[:4]
    if magic in PCAP_MAGICS or magic == PCAPNG_SHB:
        return head
    if len(head) < 4:
        raise CaptureError(f"file too short ({len(head)} bytes) for a capture header", 0)
    raise CaptureError(f"not a pcap or pcapng file (magic {magic.hex()})", 0)


def _pcap_header(head: bytes) -> tuple[str, bool, int]:
    """Byte order, nanosecond timestamps and linktype of a pcap global header."""
    endian, nano = PCAP_MAGICS[head[:4]]
    if len(head) < 24:
        raise CaptureError(f"truncated pcap global header ({len(head)} of 24 bytes)", 0)
    _, major, _minor, _tz, _sigfigs, _snaplen, network = struct.unpack_from(endian + "IHHiIII", head, 0)
    if major != 2:
        raise CaptureError(f"unsupported pcap version {major}", 4)
    # The upper bits of the linktype field carry an FCS length (pcap-savefile(5)).
    linktype = network & 0x03FFFFFF
    if linktype not in SUPPORTED_LINKTYPES:
        raise CaptureError(f"unsupported linktype {linktype_name(linktype)}", 20)
    return endian, nano, linktype


def _read_pcap(w: _Window, stats: CaptureStats) -> Iterator[Frame]:
    if not w.need(24):
        raise CaptureError(f"truncated pcap global header ({len(w.buf)} of 24 bytes)", 0)
    endian, nano, linktype = _pcap_header(w.buf[:24])
    w.pos = 24
    rec = struct.Struct(endian + "IIII")
    unpack = rec.unpack_from
    while True:
        if not w.need(16):
            if len(w.buf) - w.pos:
                raise CaptureError(f"truncated record header ({len(w.buf) - w.pos} of 16 bytes)", w.offset)
            return
        sec, frac, caplen, origlen = unpack(w.buf, w.pos)
        if caplen > MAX_RECORD_BYTES:
            raise CaptureError(f"record claims {caplen} captured bytes (limit MAX_RECORD_BYTES={MAX_RECORD_BYTES})", w.offset)
        if caplen > origlen:
            stats.warn("caplen>len")
        if not w.need(16 + caplen):
            have = len(w.buf) - w.pos - 16
            raise CaptureError(f"truncated record: {have} of {caplen} packet bytes", w.offset)
        start = w.pos + 16
        w.pos = start + caplen
        ts = sec * 1_000_000 + (frac // 1000 if nano else frac)
        yield Frame(ts, linktype, w.buf[start : start + caplen], origlen)


def _read_pcapng(w: _Window, stats: CaptureStats) -> Iterator[Frame]:
    endian = "<"
    # Per section: interface id → (linktype, units per second, offset seconds).
    ifaces: list[tuple[int, int, int]] = []
    while True:
        if not w.need(12):
            if len(w.buf) - w.pos:
                raise CaptureError("truncated pcapng block header", w.offset)
            return
        btype_raw = w.buf[w.pos : w.pos + 4]
        if btype_raw == PCAPNG_SHB:
            bom = w.buf[w.pos + 8 : w.pos + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise CaptureError(f"bad pcapng byte-order magic {bom.hex()}", w.offset + 8)
            ifaces = []
        btype, blen = struct.unpack_from(endian + "II", w.buf, w.pos)
        if blen < 12 or blen % 4:
            raise CaptureError(f"bad pcapng block length {blen}", w.offset + 4)
        if blen > MAX_BLOCK_BYTES:
            raise CaptureError(f"pcapng block of {blen} bytes (limit MAX_BLOCK_BYTES={MAX_BLOCK_BYTES})", w.offset + 4)
        if not w.need(blen):
            raise CaptureError(f"truncated pcapng block: {len(w.buf) - w.pos} of {blen} bytes", w.offset)
        body = w.buf[w.pos + 8 : w.pos + blen - 4]
        block_offset = w.offset
        w.pos += blen
        if btype == 1:  # Interface Description Block
            if len(body) < 8:
                raise CaptureError("short interface description block", block_offset)
            linktype = struct.unpack_from(endian + "H", body, 0)[0]
            units, offset_s = _idb_options(body[8:], endian)
            ifaces.append((linktype, units, offset_s))
        elif btype in (6, 2):  # Enhanced Packet Block; obsolete Packet Block
            if len(body) < 20:
                raise CaptureError("short packet block", block_offset)
            if btype == 6:
                iface, hi, lo, caplen, origlen = struct.unpack_from(endian + "IIIII", body, 0)
            else:
                iface, _drops, hi, lo, caplen, origlen = struct.unpack_from(endian + "HHIIII", body, 0)
            if caplen > len(body) - 20:
                raise CaptureError(f"packet block claims {caplen} bytes, holds {len(body) - 20}", block_offset)
            if iface >= len(ifaces):
                raise CaptureError(f"packet on undeclared interface {iface}", block_offset)
            linktype, units, offset_s = ifaces[iface]
            ticks = (hi << 32) | lo
            ts = (ticks * 1_000_000) // units + offset_s * 1_000_000
            yield Frame(ts, linktype, body[20 : 20 + caplen], origlen)
        elif btype == 3:  # Simple Packet Block: interface 0, no timestamp
            if not ifaces:
                raise CaptureError("simple packet block before any interface", block_offset)
            origlen = struct.unpack_from(endian + "I", body, 0)[0]
            linktype = ifaces[0][0]
            yield Frame(0, linktype, body[4 : 4 + origlen], origlen)
        # Other blocks (name resolution, statistics, custom, decryption secrets): ignored.


def _idb_options(opts: bytes, endian: str) -> tuple[int, int]:
    """``if_tsresol`` (code 9) and ``if_tsoffset`` (code 14) of an IDB."""
    units, offset_s = 1_000_000, 0
    i = 0
    while i + 4 <= len(opts):
        code, length = struct.unpack_from(endian + "HH", opts, i)
        if code == 0:
            break
        val = opts[i + 4 : i + 4 + length]
        if code == 9 and length >= 1:
            r = val[0]
            units = 2 ** (r & 0x7F) if r & 0x80 else 10 ** (r & 0x7F)
        elif code == 14 and length >= 8:
            offset_s = struct.unpack_from(endian + "q", val, 0)[0]
        i += 4 + ((length + 3) & ~3)
    return units, offset_s


# ---------------------------------------------------------------------------
# Link, network and transport layers

_H = struct.Struct("!H").unpack_from
_TCP = struct.Struct("!HHIIBB").unpack_from
_UDP = struct.Struct("!HH").unpack_from


def decode(frame: Frame, stats: CaptureStats) -> Packet | None:
    """One record → a TCP/UDP ``Packet``, or None (counted in ``stats.skipped``)."""
    data, linktype = frame.data, frame.linktype
    # Fast path for the bulk of gateway traffic: Ethernet, IPv4 without options or
    # fragmentation, TCP. Same checks as the general path below, inlined.
    if linktype == ETHERNET and len(data) >= 54 and data[12] == 8 and data[13] == 0 and data[14] == 0x45:
        end = 14 + ((data[16] << 8) | data[17])
        if 54 <= end <= len(data) and data[23] == IPPROTO_TCP and not (data[20] & 0x3F or data[21]):
            sport, dport, seq, ack, doff, flags = _TCP(data, 34)
            hl = (doff >> 4) * 4
            if hl >= 20 and 34 + hl <= end:
                return Packet(frame.ts, data[26:30], data[30:34], 6, sport, dport, flags, seq, ack,
                              data[34 + hl : end], data[6:12])
    mac = None
    if linktype == ETHERNET:
        if len(data) < 14:
            stats.skip("truncated-link")
            return None
        mac = data[6:12]
        etype = _H(data, 12)[0]
        off = 14
        while etype in VLAN_TPIDS:
            if len(data) < off + 4:
                stats.skip("truncated-link")
                return None
            etype = _H(data, off + 2)[0]
            off += 4
    elif linktype == SLL:
        if len(data) < 16:
            stats.skip("truncated-link")
            return None
        etype = _H(data, 14)[0]
        if _H(data, 4)[0] == 6:  # a 6-byte link-layer address: the sender's MAC
            mac = data[6:12]
        off = 16
    elif linktype == SLL2:
        if len(data) < 20:
            stats.skip("truncated-link")
            return None
        etype = _H(data, 0)[0]
        if data[11] == 6:  # address length 6: a MAC
            mac = data[12:18]
        off = 20
    elif linktype in (RAW, 12, 14, RAW4, RAW6):
        if not data:
            stats.skip("truncated-link")
            return None
        v = data[0] >> 4
        etype = ETH_IPV4 if v == 4 else ETH_IPV6 if v == 6 else 0
        off = 0
    else:
        stats.skip(f"linktype-{linktype}")
        return None
    if etype == ETH_IPV4:
        return _ipv4(frame.ts, data, off, mac, stats)
    if etype == ETH_IPV6:
        return _ipv6(frame.ts, data, off, mac, stats)
    stats.skip("not-ip")
    return None


def _ipv4(ts: int, data: bytes, off: int, mac: bytes | None, stats: CaptureStats) -> Packet | None:
    if len(data) < off + 20 or data[off] >> 4 != 4:
        stats.skip("truncated-ip")
        return None
    ihl = (data[off] & 0x0F) * 4
    total = _H(data, off + 2)[0]
    if ihl < 20 or total < ihl:
        stats.skip("bad-ip-header")
        return None
    end = off + total
    if end > len(data):
        # Snapped by the capture's snaplen: decode what is there (RFC 791 length
        # still bounds the payload; TCP reassembly will see a gap).
        stats.warn("ip-snapped")
        end = len(data)
    if _H(data, off + 6)[0] & 0x3FFF:  # MF flag or a fragment offset
        stats.skip("ip-fragment")
        return None
    proto = data[off + 9]
    return _transport(ts, data[off + 12 : off + 16], data[off + 16 : off + 20], proto, data, off + ihl, end, mac, stats)


def _ipv6(ts: int, data: bytes, off: int, mac: bytes | None, stats: CaptureStats) -> Packet | None:
    if len(data) < off + 40 or data[off] >> 4 != 6:
        stats.skip("truncated-ip")
        return None
    plen = _H(data, off + 4)[0]
    nxt = data[off + 6]
    src, dst = data[off + 8 : off + 24], data[off + 24 : off + 40]
    end = off + 40 + plen
    if end > len(data):
        stats.warn("ip-snapped")
        end = len(data)
    p = off + 40
    while True:
        if nxt in IPV6_EXT_HEADERS:
            if p + 8 > end:
                stats.skip("truncated-ip")
                return None
            nxt, hlen = data[p], (data[p + 1] + 1) * 8
            p += hlen
        elif nxt == 51:  # AH: length in 4-byte units minus 2 (RFC 4302)
            if p + 8 > end:
                stats.skip("truncated-ip")
                return None
            nxt, hlen = data[p], (data[p + 1] + 2) * 4
            p += hlen
        elif nxt == 44:  # Fragment header: reassembly of IP fragments is not done
            stats.skip("ip-fragment")
            return None
        else:
            break
    return _transport(ts, src, dst, nxt, data, p, end, mac, stats)


def _transport(
    ts: int, src: bytes, dst: bytes, proto: int, data: bytes, p: int, end: int, mac: bytes | None, stats: CaptureStats
) -> Packet | None:
    if proto == IPPROTO_TCP:
        if p + 20 > end:
            stats.skip("truncated-tcp")
            return None
        sport, dport, seq, ack, doff, flags = _TCP(data, p)
        hl = (doff >> 4) * 4
        if hl < 20 or p + hl > end:
            stats.skip("bad-tcp-header")
            return None
        return Packet(ts, src, dst, 6, sport, dport, flags, seq, ack, data[p + hl : end], mac)
    if proto == IPPROTO_UDP:
        if p + 8 > end:
            stats.skip("truncated-udp")
            return None
        sport, dport = _UDP(data, p)
        ulen = _H(data, p + 4)[0]
        # UDP length bounds the payload when sane (8 ≤ ulen ≤ what is there).
        uend = p + ulen if 8 <= ulen <= end - p else end
        return Packet(ts, src, dst, 17, sport, dport, 0, 0, 0, data[p + 8 : uend], mac)
    stats.skip("not-tcp-udp")
    return None


def read_packets(f: BinaryIO, stats: CaptureStats | None = None) -> Iterator[Packet]:
    """Every TCP/UDP packet of a capture, decoded; other records are counted and skipped.

    Raises ``CaptureError`` where the file is damaged (after yielding all before it).
    A pcap whose single linktype we cannot decode raises at once; in pcapng an
    interface of an unknown linktype only has its packets skipped.
    ``stats`` is brought up to date at least once per ``READ_CHUNK`` bytes read.
    """
    stats = stats if stats is not None else CaptureStats()
    head = _file_head(f)
    if head[:4] in PCAP_MAGICS:
        yield from _pcap_packets(f, head, stats)
        return
    for frame in _read_pcapng(_Window(f, head), stats):
        stats.records += 1
        stats.bytes += len(frame.data)
        pkt = decode(frame, stats)
        if pkt is not None:
            stats.packets += 1
            yield pkt


_UDP_HDR = struct.Struct("!HHH").unpack_from
_new_packet = tuple.__new__
"""``tuple.__new__(Packet, fields)`` builds a Packet without the Python-level
``Packet.__new__`` frame: one C call per packet instead of two frames."""


def _pcap_packets(f: BinaryIO, head: bytes, stats: CaptureStats) -> Iterator[Packet]:
    """The packets of a classic pcap file (see Strategy in the module docstring).

    Same checks, errors and decoding as ``_read_pcap`` + ``decode``; the Ethernet /
    IPv4 / TCP-or-UDP fast path below is ``decode``'s first case, written against
    the record's offsets in the block. The counters are kept in locals and added
    to ``stats`` once per block (and when the generator ends or raises).
    """
    endian, nano, linktype = _pcap_header(head)
    unpack_record = struct.Struct(endian + "IIII").unpack_from
    tcp_header, udp_header = _TCP, _UDP_HDR
    new, packet_cls = _new_packet, Packet
    ethernet = linktype == ETHERNET
    buf, pos, base, eof = head, 24, 0, False  # base: file offset of buf[0]
    records = nbytes = packets = 0
    try:
        while True:
            n = len(buf)
            while pos + 16 <= n:
                sec, frac, caplen, origlen = unpack_record(buf, pos)
                if caplen > MAX_RECORD_BYTES:
                    raise CaptureError(f"record claims {caplen} captured bytes "
                                       f"(limit MAX_RECORD_BYTES={MAX_RECORD_BYTES})", base + pos)
                s = pos + 16
                e = s + caplen
                if e > n:
                    break  # the record runs past the block: read on
                if caplen > origlen:
                    stats.warn("caplen>len")
                pos = e
                records += 1
                nbytes += caplen
                ts = sec * 1_000_000 + (frac // 1000 if nano else frac)
                # Ethernet II, IPv4 with a 20-byte header, not a fragment (MF clear, offset 0).
                if (ethernet and caplen >= 42 and buf[s + 12] == 8 and buf[s + 13] == 0 and buf[s + 14] == 0x45
                        and not (buf[s + 20] & 0x3F or buf[s + 21])):
                    end = s + 14 + ((buf[s + 16] << 8) | buf[s + 17])  # IP total length: drops Ethernet padding
                    proto = buf[s + 23]
                    t = s + 34
                    if proto == IPPROTO_TCP and t + 20 <= end <= e:
                        sport, dport, seq, ack, doff, flags = tcp_header(buf, t)
                        hl = (doff >> 4) * 4
                        if hl >= 20 and t + hl <= end:
                            packets += 1
                            yield new(packet_cls, (ts, buf[s + 26 : s + 30], buf[s + 30 : s + 34], 6, sport, dport,
                                                   flags, seq, ack, buf[t + hl : end], buf[s + 6 : s + 12]))
                            continue
                    elif proto == IPPROTO_UDP and t + 8 <= end <= e:
                        sport, dport, ulen = udp_header(buf, t)
                        uend = t + ulen if 8 <= ulen <= end - t else end
                        packets += 1
                        yield new(packet_cls, (ts, buf[s + 26 : s + 30], buf[s + 30 : s + 34], 17, sport, dport,
                                               0, 0, 0, buf[t + 8 : uend], buf[s + 6 : s + 12]))
                        continue
                pkt = decode(Frame(ts, linktype, buf[s:e], origlen), stats)
                if pkt is not None:
                    packets += 1
                    yield pkt
            if eof:
                rest = n - pos
                if not rest:
                    return
                if rest < 16:
                    raise CaptureError(f"truncated record header ({rest} of 16 bytes)", base + pos)
                caplen = unpack_record(buf, pos)[2]
                raise CaptureError(f"truncated record: {rest - 16} of {caplen} packet bytes", base + pos)
            stats.records += records
            stats.bytes += nbytes
            stats.packets += packets
            records = nbytes = packets = 0
            rest = n - pos
            if rest:
                # A record straddles the end of the block: complete it in a small buffer
                # of its own, so that the next block is used as read (joining a remainder
                # to a 4 MiB block would cost a fresh 4 MiB copy). The inner loop has
                # already checked its caplen when its header is whole.
                want = 16 if rest < 16 else 16 + unpack_record(buf, pos)[2]
                more = f.read(want - rest)
                eof = len(more) < want - rest  # then once more round the loop: the tail is damage
                buf = buf[pos:] + more
            else:
                buf = f.read(READ_CHUNK)
                eof = not buf
            base += pos
            pos = 0
    finally:
        stats.records += records
        stats.bytes += nbytes
        stats.packets += packets
