"""Test helper: build packet captures (pcap, pcapng) of TCP conversations and DNS.

Packets are framed with our own ``struct`` code here (checksums computed), written
in every file variant the reader must handle, and can be reordered, duplicated,
overlapped or cut into one-byte segments before writing. Used by the replay tests.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass
class Seg:
    """One packet of a conversation, before framing."""

    from_client: bool
    seq: int
    ack: int
    flags: int
    payload: bytes = b""
    ts: int = 0
    """µs; filled in by ``Conversation.timestamps`` if 0."""


def ip_packet(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, s.packed, d.packed)
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        return hdr + l4
    return struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, 64, s.packed, d.packed) + l4


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        return s.packed + d.packed + struct.pack("!BBH", 0, proto, length)
    return s.packed + d.packed + struct.pack("!IxxxB", length, proto)


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535, 0, 0)
    c = _csum(_pseudo(src, dst, 6, len(hdr) + len(payload)) + hdr + payload)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:] + payload


def udp_datagram(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    hdr = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    c = _csum(_pseudo(src, dst, 17, len(hdr) + len(payload)) + hdr + payload) or 0xFFFF
    return hdr[:6] + struct.pack("!H", c) + payload


def link_frame(ip: bytes, linktype: int = 1, vlans: Sequence[int] = (), mac: bytes = b"\x02\0\0\0\0\x01") -> bytes:
    """Wrap an IP packet for ``linktype`` (1 Ethernet with optional VLAN tags, 113 SLL,
    276 SLL2, 101/228/229 raw)."""
    etype = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    if linktype == 1:
        tags = b""
        tpids = [0x88A8] * (len(vlans) - 1) + [0x8100] if vlans else []
        for tpid, vid in zip(tpids, vlans):
            tags += struct.pack("!HH", tpid, vid)
        # A VLAN tag's TPID sits where the ethertype would be.
        if tags:
            return b"\x02\0\0\0\0\x02" + mac + tags[:2] + tags[2:] + struct.pack("!H", etype) + ip
        return b"\x02\0\0\0\0\x02" + mac + struct.pack("!H", etype) + ip
    if linktype == 113:
        return struct.pack("!HHH8sH", 0, 1, 6, mac + b"\0\0", etype) + ip
    if linktype == 276:
        return struct.pack("!HHIHBB8s", etype, 0, 2, 1, 0, 6, mac + b"\0\0") + ip
    if linktype in (101, 228, 229):
        return ip
    raise ValueError(linktype)


@dataclass
class Conversation:
    """A TCP connection's packets, built in order, then mangled as a test likes."""

    client: tuple[str, int] = ("192.0.2.10", 40000)
    server: tuple[str, int] = ("198.51.100.20", 80)
    isn_c: int = 1000
    isn_s: int = 900_000
    segs: list[Seg] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.c_next = (self.isn_c + 1) & 0xFFFFFFFF
        self.s_next = (self.isn_s + 1) & 0xFFFFFFFF

    def handshake(self) -> Conversation:
        self.segs += [
            Seg(True, self.isn_c, 0, SYN),
            Seg(False, self.isn_s, self.c_next, SYN | ACK),
            Seg(True, self.c_next, self.s_next, ACK),
        ]
        return self

    def send(self, from_client: bool, data: bytes, mss: int = 1400) -> Conversation:
        for i in range(0, len(data), mss):
            piece = data[i : i + mss]
            if from_client:
                self.segs.append(Seg(True, self.c_next, self.s_next, PSH | ACK, piece))
                self.c_next = (self.c_next + len(piece)) & 0xFFFFFFFF
            else:
                self.segs.append(Seg(False, self.s_next, self.c_next, PSH | ACK, piece))
                self.s_next = (self.s_next + len(piece)) & 0xFFFFFFFF
        return self

    def close(self) -> Conversation:
        self.segs += [
            Seg(True, self.c_next, self.s_next, FIN | ACK),
            Seg(False, self.s_next, (self.c_next + 1) & 0xFFFFFFFF, FIN | ACK),
            Seg(True, (self.c_next + 1) & 0xFFFFFFFF, (self.s_next + 1) & 0xFFFFFFFF, ACK),
        ]
        return self

    def packets(self, linktype: int = 1, vlans: Sequence[int] = (), t0: int = 1_700_000_000_000_000) -> list[tuple[int, bytes]]:
        out = []
        for i, s in enumerate(self.segs):
            (a, ap), (b, bp) = (self.client, self.server) if s.from_client else (self.server, self.client)
            ip = ip_packet(a, b, 6, tcp_segment(a, b, ap, bp, s.seq, s.ack, s.flags, s.payload))
            out.append((s.ts or t0 + i * 1000, link_frame(ip, linktype, vlans)))
        return out


def udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes, ts: int, linktype: int = 1) -> tuple[int, bytes]:
    ip = ip_packet(src[0], dst[0], 17, udp_datagram(src[0], dst[0], src[1], dst[1], payload))
    return ts, link_frame(ip, linktype)


def pcap_bytes(packets: Iterable[tuple[int, bytes]], linktype: int = 1, *, nano: bool = False, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    for ts, data in packets:
        sec, usec = divmod(ts, 1_000_000)
        frac = usec * 1000 if nano else usec
        out.append(struct.pack(e + "IIII", sec, frac, len(data), len(data)) + data)
    return b"".join(out)


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def pcapng_bytes(packets: Iterable[tuple[int, bytes]], linktype: int = 1, *, tsresol: int | None = None,
                 big_endian: bool = False) -> bytes:
    """One section, one interface; ``tsresol`` is the if_tsresol byte (default µs)."""
    e = ">" if big_endian else "<"

    def block(btype: int, body: bytes) -> bytes:
        body = _pad4(body)
        n = 12 + len(body)
        return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)

    shb = block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    opts = b""
    units = 1_000_000
    if tsresol is not None:
        opts = struct.pack(e + "HH", 9, 1) + _pad4(bytes([tsresol])) + struct.pack(e + "HH", 0, 0)
        units = 2 ** (tsresol & 0x7F) if tsresol & 0x80 else 10 ** tsresol
    idb = block(1, struct.pack(e + "HHI", linktype, 0, 262144) + opts)
    out = [shb, idb]
    for ts, data in packets:
        ticks = ts * units // 1_000_000
        out.append(block(6, struct.pack(e + "IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)) + _pad4(data)))
    return b"".join(out)
