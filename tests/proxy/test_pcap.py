"""Tests for proxy/pcap.py: every file variant and link layer, and damaged files."""

from __future__ import annotations

import io
import struct

import dpkt
import pytest

import proxy.pcap as pcap_module
from proxy.pcap import (
    MAX_RECORD_BYTES,
    CaptureError,
    CaptureStats,
    Packet,
    decode,
    ip_text,
    read_frames,
    read_packets,
)
from tests.proxy.captures import Conversation, pcap_bytes, pcapng_bytes, udp_packet

T0 = 1_700_000_000_123_456


def _conv(v6: bool = False) -> Conversation:
    if v6:
        c = Conversation(client=("2001:db8::10", 40001), server=("2001:db8:1::20", 80))
    else:
        c = Conversation()
    return c.handshake().send(True, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n").close()


def _read(data: bytes) -> tuple[list[Packet], CaptureStats]:
    stats = CaptureStats()
    return list(read_packets(io.BytesIO(data), stats)), stats


@pytest.mark.parametrize("nano", [False, True])
@pytest.mark.parametrize("big_endian", [False, True])
def test_pcap_both_byte_orders_and_resolutions(nano: bool, big_endian: bool) -> None:
    pkts = _conv().packets(t0=T0)
    got, stats = _read(pcap_bytes(pkts, nano=nano, big_endian=big_endian))
    assert stats.records == len(pkts) == len(got) == 7
    assert got[0].ts == T0
    assert got[0].flags == 0x02 and got[3].payload.startswith(b"GET /")
    assert ip_text(got[0].src) == "192.0.2.10" and got[0].sport == 40000 and got[0].dport == 80


@pytest.mark.parametrize("tsresol", [None, 9, 0x80 | 20])
@pytest.mark.parametrize("big_endian", [False, True])
def test_pcapng_timestamps_and_byte_orders(tsresol: int | None, big_endian: bool) -> None:
    pkts = _conv().packets(t0=T0)
    got, _ = _read(pcapng_bytes(pkts, tsresol=tsresol, big_endian=big_endian))
    assert len(got) == 7
    assert abs(got[0].ts - T0) <= 1  # 2^-20 s ticks round by < 1 µs
    assert got[3].payload.startswith(b"GET /")


@pytest.mark.parametrize(
    ("linktype", "vlans"),
    [(1, ()), (1, (100,)), (1, (10, 20)), (113, ()), (276, ()), (101, ()), (228, ())],
)
def test_link_layers_ipv4(linktype: int, vlans: tuple[int, ...]) -> None:
    got, stats = _read(pcap_bytes(_conv().packets(linktype=linktype, vlans=vlans), linktype=linktype))
    assert len(got) == 7, stats
    assert got[3].payload.startswith(b"GET /")
    if linktype in (1, 113, 276):
        assert got[0].mac == b"\x02\0\0\0\0\x01"


@pytest.mark.parametrize(("linktype", "vlans"), [(1, ()), (1, (7,)), (113, ()), (276, ()), (101, ()), (229, ())])
def test_link_layers_ipv6(linktype: int, vlans: tuple[int, ...]) -> None:
    got, _ = _read(pcap_bytes(_conv(v6=True).packets(linktype=linktype, vlans=vlans), linktype=linktype))
    assert len(got) == 7
    assert ip_text(got[3].src) == "2001:db8::10" and got[3].payload.startswith(b"GET /")


def test_ethernet_padding_is_trimmed_by_ip_length() -> None:
    ts, frame = udp_packet(("192.0.2.1", 5000), ("198.51.100.53", 53), b"ab", T0)
    got, _ = _read(pcap_bytes([(ts, frame + b"\0" * 20)]))
    assert got[0].payload == b"ab"


def test_reads_what_dpkt_writes() -> None:
    # An independent writer: dpkt builds the frames and the file.
    buf = io.BytesIO()
    w = dpkt.pcap.Writer(buf, nano=True)
    ip = dpkt.ip.IP(src=bytes([192, 0, 2, 1]), dst=bytes([198, 51, 100, 1]), p=6,
                    data=dpkt.tcp.TCP(sport=1234, dport=80, seq=77, flags=dpkt.tcp.TH_ACK, data=b"hello"))
    ip.len = len(bytes(ip))
    eth = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    w.writepkt(bytes(eth), ts=1700000000.5)
    got, _ = _read(buf.getvalue())
    assert got == [Packet(1_700_000_000_500_000, bytes([192, 0, 2, 1]), bytes([198, 51, 100, 1]), 6, 1234, 80,
                          dpkt.tcp.TH_ACK, 77, 0, b"hello", b"\x02" * 6)]


def test_ip_fragments_and_non_ip_are_counted_and_skipped() -> None:
    ts, frame = udp_packet(("192.0.2.1", 5000), ("198.51.100.53", 53), b"x", T0)
    frag = bytearray(frame)
    frag[14 + 6] = 0x20  # MF flag
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\0" * 28
    got, stats = _read(pcap_bytes([(ts, bytes(frag)), (ts, arp), (ts, frame)]))
    assert len(got) == 1
    assert stats.skipped == {"ip-fragment": 1, "not-ip": 1}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "truncated pcap global header"),
        (b"\x00\x11\x22\x33" + b"\0" * 40, "not a pcap or pcapng file"),
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 105), r"unsupported linktype 105 \(IEEE 802\.11\)"),
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack("<IIII", 1, 0, MAX_RECORD_BYTES + 1, 60),
         "limit MAX_RECORD_BYTES"),
    ],
)
def test_damaged_files_raise_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(CaptureError, match=message):
        _read(data)


def test_truncated_record_keeps_the_packets_before_it() -> None:
    data = pcap_bytes(_conv().packets())
    got: list[Packet] = []
    with pytest.raises(CaptureError, match="truncated record") as exc:
        for p in read_packets(io.BytesIO(data[:-10])):
            got.append(p)
    assert len(got) == 6
    assert exc.value.offset is not None and exc.value.offset > 24


def test_garbage_after_records_is_an_error_after_the_good_packets() -> None:
    data = pcap_bytes(_conv().packets()) + b"\x01\x02\x03"
    got: list[Packet] = []
    with pytest.raises(CaptureError, match="truncated record header"):
        got.extend(read_packets(io.BytesIO(data)))
    assert len(got) == 7


def test_big_capture_is_read_across_read_windows() -> None:
    conv = Conversation().handshake().send(True, b"x" * 3_000_000, mss=1400).close()
    got, stats = _read(pcap_bytes(conv.packets()))
    assert sum(len(p.payload) for p in got) == 3_000_000
    assert stats.records == len(conv.segs)


def test_corpus_bad_pcaps(corpus) -> None:  # type: ignore[no-untyped-def]
    """Every damaged capture of the corpus: a CaptureError or packets, never another exception."""
    outcomes = {}
    for path in sorted((corpus / "bad" / "pcap").glob("*.pcap")):
        stats = CaptureStats()
        n = 0
        try:
            with open(path, "rb") as f:
                for _ in read_packets(f, stats):
                    n += 1
            outcomes[path.name] = n
        except CaptureError as e:
            outcomes[path.name] = str(e)
    assert outcomes["linktype_linux_sll.pcap"] == 1
    assert outcomes["linktype_raw_ip.pcap"] == 1
    assert outcomes["pcapng_format.pcap"] == 0
    assert "2147483647" in outcomes["caplen_huge.pcap"]
    assert "IEEE 802.11" in outcomes["linktype_80211.pcap"]
    assert "truncated record" in outcomes["truncated_mid_record.pcap"]
    assert "empty file" in outcomes["empty.pcap"]
    assert "magic" in outcomes["bad_magic.pcap"]


def _frames_decoded(data: bytes) -> tuple[list[Packet | str], CaptureStats]:
    """The general path: every record as a ``Frame``, then ``decode``."""
    stats = CaptureStats()
    out: list[Packet | str] = []
    try:
        for frame in read_frames(io.BytesIO(data), stats):
            stats.records += 1
            stats.bytes += len(frame.data)
            pkt = decode(frame, stats)
            if pkt is not None:
                stats.packets += 1
                out.append(pkt)
    except CaptureError as e:
        out.append(str(e))
    return out, stats


def _fast(data: bytes) -> tuple[list[Packet | str], CaptureStats]:
    stats = CaptureStats()
    out: list[Packet | str] = []
    try:
        out.extend(read_packets(io.BytesIO(data), stats))
    except CaptureError as e:
        out.append(str(e))
    return out, stats


def _odd_records() -> list[tuple[int, bytes]]:
    """Records the pcap fast path must pass on (or decode) exactly as ``decode`` does."""
    conv = _conv().packets(t0=T0)
    ts, udp = udp_packet(("192.0.2.1", 5000), ("198.51.100.53", 53), b"query", T0)
    tcp = conv[3][1]
    frag = bytearray(udp)
    frag[14 + 7] = 0x10  # a fragment offset
    opts = bytearray(tcp)
    opts[14] = 0x46  # IPv4 header with options: the general path
    snapped = tcp[:60]  # IP total length beyond the captured bytes
    bad_udp_len = bytearray(udp)
    bad_udp_len[14 + 20 + 4 : 14 + 20 + 6] = b"\xff\xff"
    bad_doff = bytearray(tcp)
    bad_doff[14 + 20 + 12] = 0x20  # data offset 8 bytes: below the minimum
    return [*conv, (ts, udp), (ts, udp + b"\0" * 20), (ts, bytes(frag)), (ts, bytes(opts)), (ts, snapped),
            (ts, bytes(bad_udp_len)), (ts, bytes(bad_doff)), (ts, tcp[:40]), (ts, b"\x01" * 13),
            *_conv(v6=True).packets(vlans=(5,))]


@pytest.mark.parametrize("nano", [False, True])
def test_pcap_fast_path_gives_what_the_general_decoder_gives(nano: bool) -> None:
    data = pcap_bytes(_odd_records(), nano=nano)
    fast, fast_stats = _fast(data)
    general, general_stats = _frames_decoded(data)
    assert fast == general
    assert fast_stats == general_stats
    assert len(fast) >= 15 and general_stats.skipped and general_stats.warnings


def test_records_straddling_every_read_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny read blocks put a block boundary inside every record header and body;
    # truncated files end at every such place too.
    data = pcap_bytes(_odd_records() + _conv().send(False, b"y" * 3000).packets())
    expected = _frames_decoded(data)
    for chunk in (7, 16, 33, 100):
        monkeypatch.setattr(pcap_module, "READ_CHUNK", chunk)
        assert _fast(data) == expected
        for cut in range(24, len(data), 97):
            got, _ = _fast(data[:cut])
            assert got == _frames_decoded(data[:cut])[0]
