"""Tests for proxy/replay.py: the corpus capture against its labels, and captures made
here with every TCP mishap, link layer and protocol the driver must handle.

The same conversation is written many ways (in order, shuffled, duplicated, in
one-byte segments, wrapped sequence numbers, IPv6, VLAN, SLL...) and must give the
same decisions each time (STYLE.md 3).
"""

from __future__ import annotations

import io
import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import dnslib
import pytest

from proxy.pcap import read_packets
from proxy.replay import (
    ConnSummary, Decision, OrderKeys, OrderMark, Replay, ReplayLimits, _qname_text, read_common_dns, to_record,
)
from tests.proxy.captures import (
    ACK,
    RST,
    Conversation,
    Seg,
    pcap_bytes,
    pcapng_bytes,
    udp_packet,
)
from tests.proxy.test_tlshello import openssl_hello

from rules.engine import Engine  # noqa: E402

KEYWORD = "成都笑气"  # corpus keyword P00003 (drugs)
BLOCKED_HOST = "m87-fantan96594.club"  # corpus exact entry
WILDCARD_HOST = "api.dianji-xiaoyin842.online"  # under corpus *.dianji-xiaoyin842.online
APEX_OF_WILDCARD = "dianji-xiaoyin842.online"  # not listed itself: allow


def corpus_rules_dir(corpus: Path, dest: Path) -> Path:
    """The corpus lists as a linewarden rule set: keywords.tsv as is; domains.txt
    converted (exact ``name`` → ``=name``, ``*.name`` kept; ids D00001...)."""
    dest.mkdir(parents=True, exist_ok=True)
    kw = (corpus / "rules" / "keywords.tsv").read_text(encoding="utf-8")
    (dest / "keywords.tsv").write_text(kw, encoding="utf-8")
    lines = ["id\tcategory\tdomain\taction"]
    n = 0
    for line in (corpus / "rules" / "domains.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pattern, category = line.split("\t")[:2]
        n += 1
        lines.append(f"D{n:05d}\t{category}\t{pattern if pattern.startswith('*.') else '=' + pattern}\tblock")
    (dest / "domains.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    categories = sorted({ln.split("\t")[1] for ln in kw.splitlines()[1:] if ln} | {"gambling"})
    toml = ['name = "corpus"', "version = 7", ""]
    for c in categories:
        toml += [f"[categories.{c}]", 'action = "block"', ""]
    (dest / "ruleset.toml").write_text("\n".join(toml), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def engine(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine.from_dir(corpus_rules_dir(corpus, tmp_path_factory.mktemp("rules")))


def replay_bytes(engine: Engine, data: bytes, **kw: object) -> tuple[list[Decision], Replay]:
    rp = Replay(engine, **kw)  # type: ignore[arg-type]
    outs = list(rp.run(read_packets(io.BytesIO(data))))
    return [o for o in outs if isinstance(o, Decision)], rp


def summary(ds: list[Decision]) -> list[tuple[str, int, str, str | None, int | None]]:
    return sorted((d.kind, d.index, d.action, d.url or d.sni or d.qname, d.status) for d in ds)


# ---------------------------------------------------------------------------
# The corpus capture


def test_corpus_capture_gives_its_labelled_decisions(engine: Engine, corpus: Path) -> None:
    labels = [json.loads(line) for line in (corpus / "pcap" / "labels.jsonl").read_text().splitlines()]
    decisions, rp = replay_bytes(engine, (corpus / "pcap" / "capture.pcap").read_bytes())
    rows = [d.to_json() for d in decisions]
    by_conn = {(r["client"], r["server"], r["index"]): r for r in rows if r["kind"] in ("http", "tls")}
    by_dns = {(int(r["client"].rsplit(":", 1)[1]), r["dns_id"], r["qname"]): r for r in rows if r["kind"] == "dns"}
    wrong, matched, malformed = [], 0, 0
    for lab in labels:
        if lab["type"] == "dns" and lab["expect"] == "malformed":
            malformed += 1
            continue
        if lab["type"] == "dns":
            got = by_dns.get((lab["client_port"], lab["id"], lab["qname"]))
        else:
            got = by_conn.get((lab["client"], lab["server"], lab["index"]))
        if got is None or got["action"] != lab["expect"]:
            wrong.append((lab, got))
        else:
            matched += 1
    assert not wrong, f"{len(wrong)} of {len(labels)} labels wrong, e.g. {wrong[:3]}"
    assert matched == len(labels) - malformed == 576
    # The malformed DNS packets were counted and skipped, and packets after them were still decided.
    assert rp.stats.dns_malformed >= 10
    assert max(d.ts for d in decisions) >= max(d.ts for d in decisions if d.kind == "dns")


def test_corpus_malformed_dns_capture_does_not_stop_the_replay(engine: Engine, corpus: Path) -> None:
    data = (corpus / "bad" / "dns" / "malformed.pcap").read_bytes()
    good = dnslib.DNSRecord.question(BLOCKED_HOST).pack()
    # A good query after the 15 malformed ones, in the same capture.
    extra = pcap_bytes([udp_packet(("192.0.2.99", 5353), ("198.51.100.53", 53), good, 1_900_000_000_000_000)])
    decisions, rp = replay_bytes(engine, data + extra[24:])
    assert rp.stats.dns_malformed >= 10
    assert [d.action for d in decisions if d.qname == BLOCKED_HOST] == ["block"]


# ---------------------------------------------------------------------------
# HTTP over TCP made here

PAGE_BLOCK = f"<html><body><p>今天 {KEYWORD} 出售</p></body></html>".encode()
PAGE_ALLOW = "<html><body><p>图书馆开放时间调整</p></body></html>".encode()


def response(body: bytes, *, chunked: bool = False) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
    if chunked:
        mid = len(body) // 2
        framed = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (body[:mid], body[mid:])) + b"0\r\n\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + framed
    return head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def request(path: str = "/", host: str = "www.example.com", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n".encode()


def keepalive(isn_c: int = 1000, isn_s: int = 900_000, mss: int = 40, **kw: object) -> Conversation:
    """Three transactions: allow, block (response keyword), block (request host)."""
    c = Conversation(isn_c=isn_c, isn_s=isn_s, **kw).handshake()  # type: ignore[arg-type]
    c.send(True, request("/a")).send(False, response(PAGE_ALLOW), mss=mss)
    c.send(True, request("/b")).send(False, response(PAGE_BLOCK, chunked=True), mss=mss)
    c.send(True, request("/c", host=BLOCKED_HOST)).send(False, response(PAGE_ALLOW), mss=mss)
    return c.close()


EXPECTED = [("http", 0, "allow", "/a", 200), ("http", 1, "block", "/b", 200), ("http", 2, "block", "/c", 200)]


def _data_segs(c: Conversation) -> tuple[list[Seg], list[Seg], list[Seg]]:
    return c.segs[:3], c.segs[3:-3], c.segs[-3:]


def shuffled(c: Conversation) -> Conversation:
    head, data, tail = _data_segs(c)
    rnd = random.Random(3)
    # Reorder within each direction's run, keeping request-before-response causality
    # coarse: shuffle windows of 6 packets.
    out = []
    for i in range(0, len(data), 6):
        w = data[i : i + 6]
        rnd.shuffle(w)
        out += w
    c.segs = head + out + tail
    return c


def duplicated(c: Conversation) -> Conversation:
    head, data, tail = _data_segs(c)
    out = []
    for i, s in enumerate(data):
        out.append(s)
        if i % 3 == 0:
            out.append(Seg(s.from_client, s.seq, s.ack, s.flags, s.payload))
    c.segs = head + out + tail
    return c


def overlapped(c: Conversation) -> Conversation:
    """Retransmissions covering two neighbouring segments with other boundaries."""
    head, data, tail = _data_segs(c)
    out = []
    for i, s in enumerate(data):
        out.append(s)
        nxt = data[i + 1] if i + 1 < len(data) else None
        if nxt is not None and nxt.from_client == s.from_client and i % 4 == 1 and len(s.payload) > 4:
            cut = len(s.payload) // 2
            out.append(Seg(s.from_client, (s.seq + cut) & 0xFFFFFFFF, s.ack, ACK, s.payload[cut:] + nxt.payload[:5]))
    c.segs = head + out + tail
    return c


def one_byte(c: Conversation) -> Conversation:
    head, data, tail = _data_segs(c)
    out = []
    for s in data:
        for i in range(len(s.payload)):
            out.append(Seg(s.from_client, (s.seq + i) & 0xFFFFFFFF, s.ack, ACK, s.payload[i : i + 1]))
    c.segs = head + out + tail
    return c


VARIANTS: dict[str, Callable[[], bytes]] = {
    "in-order": lambda: pcap_bytes(keepalive().packets()),
    "out-of-order": lambda: pcap_bytes(shuffled(keepalive()).packets()),
    "retransmission": lambda: pcap_bytes(duplicated(keepalive()).packets()),
    "overlap-retransmission": lambda: pcap_bytes(overlapped(keepalive()).packets()),
    "one-byte-segments": lambda: pcap_bytes(one_byte(keepalive()).packets()),
    "seq-wraparound": lambda: pcap_bytes(keepalive(isn_c=0xFFFFFFFF - 30, isn_s=0xFFFFFFFF - 100).packets()),
    "ipv6": lambda: pcap_bytes(keepalive(client=("2001:db8::5", 41000), server=("2001:db8:2::80", 80)).packets()),
    "vlan": lambda: pcap_bytes(keepalive().packets(vlans=(100,))),
    "qinq": lambda: pcap_bytes(keepalive().packets(vlans=(10, 20))),
    "sll": lambda: pcap_bytes(keepalive().packets(linktype=113), linktype=113),
    "sll2-ipv6": lambda: pcap_bytes(keepalive(client=("2001:db8::5", 41000), server=("2001:db8:2::80", 80))
                                    .packets(linktype=276), linktype=276),
    "raw-ip": lambda: pcap_bytes(keepalive().packets(linktype=101), linktype=101),
    "pcapng-nanosecond-big-endian": lambda: pcapng_bytes(keepalive().packets(), tsresol=9, big_endian=True),
    "all-at-once-mss-1400": lambda: pcap_bytes(keepalive(mss=1400).packets()),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_decisions_however_the_packets_come(engine: Engine, variant: str) -> None:
    decisions, rp = replay_bytes(engine, VARIANTS[variant]())
    assert summary(decisions) == EXPECTED
    assert all(not d.errors for d in decisions), [d.errors for d in decisions]
    assert rp.stats.gaps == 0


def test_decision_fields_and_json(engine: Engine) -> None:
    decisions, _ = replay_bytes(engine, pcap_bytes(keepalive().packets(t0=1_800_000_000_000_000)))
    d = next(d for d in decisions if d.index == 1)
    row = d.to_json()
    assert row["conn"] == "192.0.2.10:40000-198.51.100.20:80"
    assert row["client"] == "192.0.2.10:40000" and row["server"] == "198.51.100.20:80"
    assert row["method"] == "GET" and row["host"] == "www.example.com" and row["url"] == "/b"
    assert row["status"] == 200 and row["action"] == "block"
    assert row["matches"][0]["rule_id"] == "P00003" and row["matches"][0]["where"] == "body"
    assert "sni" not in row and "qname" not in row
    assert row["ts"] > 1_800_000_000_000_000
    assert d.community_id.startswith("1:") and d.uid.startswith("C")


def test_pipelined_requests_pair_in_order_and_head_has_no_body(engine: Engine) -> None:
    c = Conversation().handshake()
    # All requests first; the HEAD's response carries Content-Length but no body.
    c.send(True, request("/one") + request("/two", method="HEAD") + request("/three"))
    c.send(False, response(PAGE_ALLOW) + response(PAGE_BLOCK)[: response(PAGE_BLOCK).index(b"\r\n\r\n") + 4]
           + response(PAGE_BLOCK), mss=30)
    decisions, _ = replay_bytes(engine, pcap_bytes(c.close().packets()))
    assert [(d.index, d.method, d.url, d.action) for d in sorted(decisions, key=lambda d: d.index)] == [
        (0, "GET", "/one", "allow"), (1, "HEAD", "/two", "allow"), (2, "GET", "/three", "block")]


def test_interim_100_continue_is_not_the_answer(engine: Engine) -> None:
    c = Conversation().handshake()
    body = f"q={KEYWORD}".encode()
    c.send(True, b"POST /f HTTP/1.1\r\nHost: a.example\r\nExpect: 100-continue\r\n"
           b"Content-Type: application/x-www-form-urlencoded; charset=utf-8\r\n"
           + f"Content-Length: {len(body)}\r\n\r\n".encode())
    c.send(False, b"HTTP/1.1 100 Continue\r\n\r\n").send(True, body).send(False, response(PAGE_ALLOW))
    decisions, _ = replay_bytes(engine, pcap_bytes(c.close().packets()))
    assert [(d.status, d.action) for d in decisions] == [(200, "block")]


def test_missing_segment_is_flagged_and_the_connection_continues(engine: Engine) -> None:
    c = keepalive(mss=40)
    # Drop one server segment in the middle of the first response's body.
    first_resp = [i for i, s in enumerate(c.segs) if not s.from_client and s.payload]
    del c.segs[first_resp[2]]
    decisions, rp = replay_bytes(engine, pcap_bytes(c.packets()))
    by_index = {d.index: d for d in decisions}
    assert any("40 bytes missing" in e for e in by_index[0].errors)
    # The later transactions are still decided, the block ones blocked.
    assert by_index[1].action == "block" and by_index[2].action == "block"
    assert rp.stats.gaps == 1 and rp.stats.gap_bytes == 40


def test_missing_request_bytes_resync_on_the_next_request(engine: Engine) -> None:
    c = Conversation().handshake()
    c.send(True, request("/first" + "x" * 200), mss=50)
    c.send(False, response(PAGE_ALLOW))
    c.send(True, request("/second", host=BLOCKED_HOST)).send(False, response(PAGE_ALLOW))
    c.close()
    client_data = [i for i, s in enumerate(c.segs) if s.from_client and s.payload]
    del c.segs[client_data[1]]
    decisions, _ = replay_bytes(engine, pcap_bytes(c.packets()))
    assert any(d.url == "/second" and d.action == "block" for d in decisions)
    assert any(d.errors for d in decisions)


def test_reset_connection_decides_the_request_without_response(engine: Engine) -> None:
    c = Conversation().handshake().send(True, request("/x", host=BLOCKED_HOST))
    c.segs.append(Seg(False, c.s_next, c.c_next, RST | ACK))
    decisions, rp = replay_bytes(engine, pcap_bytes(c.packets()), want_conns=True)
    assert [(d.url, d.status, d.action) for d in decisions] == [("/x", None, "block")]


def test_capture_without_handshake_is_picked_up_midstream(engine: Engine) -> None:
    c = keepalive()
    c.segs = c.segs[3:]
    decisions, _ = replay_bytes(engine, pcap_bytes(c.packets()))
    assert summary(decisions) == EXPECTED


def test_port_reuse_starts_a_new_connection(engine: Engine) -> None:
    a = Conversation(isn_c=10, isn_s=20).handshake().send(True, request("/first")).send(False, response(PAGE_ALLOW))
    b = Conversation(isn_c=50_000, isn_s=90_000).handshake().send(True, request("/again")).send(
        False, response(PAGE_BLOCK))
    pkts = a.close().packets(t0=1_700_000_000_000_000) + b.close().packets(t0=1_700_000_010_000_000)
    decisions, rp = replay_bytes(engine, pcap_bytes(pkts))
    assert [(d.url, d.index, d.action) for d in decisions] == [("/first", 0, "allow"), ("/again", 0, "block")]
    assert rp.stats.tcp_flows == 2


def test_flow_limit_closes_the_oldest_and_still_decides(engine: Engine) -> None:
    pkts = []
    for i in range(30):
        c = Conversation(client=("192.0.2.50", 30000 + i)).handshake()
        c.send(True, request(f"/{i}", host=BLOCKED_HOST if i % 2 else "a.example"))
        pkts += c.packets(t0=1_700_000_000_000_000 + i * 10_000)  # left open: no response, no FIN
    decisions, rp = replay_bytes(engine, pcap_bytes(pkts), limits=ReplayLimits(max_flows=8))
    assert rp.stats.evicted_flows > 0
    assert len(decisions) == 30
    assert sum(d.action == "block" for d in decisions) == 15


def test_idle_connection_times_out_in_capture_time(engine: Engine) -> None:
    c = Conversation().handshake().send(True, request("/idle", host=BLOCKED_HOST))
    later = udp_packet(("192.0.2.1", 4000), ("198.51.100.53", 53), dnslib.DNSRecord.question("a.example").pack(),
                       1_700_000_000_000_000 + 400_000_000)
    rp = Replay(engine, want_conns=True)
    outs = []
    for pkt in read_packets(io.BytesIO(pcap_bytes(c.packets() + [later]))):
        outs += rp.packet(pkt)
    # Decided before the end of the capture, because the connection went idle.
    conns = [o for o in outs if isinstance(o, ConnSummary)]
    assert [o.close_reason for o in conns] == ["timeout"]
    assert [d.url for d in outs if isinstance(d, Decision)] == ["/idle"]


# ---------------------------------------------------------------------------
# TLS


def tls_conv(sni: str, split: int | None = None, records: int | None = None) -> bytes:
    hello = openssl_hello(sni, ["h2", "http/1.1"])
    if records:
        hs = hello[5:]
        step = len(hs) // records + 1
        hello = b"".join(b"\x16\x03\x01" + struct.pack("!H", len(hs[i : i + step])) + hs[i : i + step]
                         for i in range(0, len(hs), step))
    c = Conversation(server=("203.0.113.5", 443)).handshake()
    c.send(True, hello, mss=split or 1400).send(False, b"\x16\x03\x03\x00\x02\x02\x00")
    return pcap_bytes(c.close().packets())


@pytest.mark.parametrize(("split", "records"), [(None, None), (100, None), (1, None), (None, 3), (70, 4)])
def test_tls_sni_decided_however_the_hello_is_cut(engine: Engine, split: int | None, records: int | None) -> None:
    decisions, _ = replay_bytes(engine, tls_conv(WILDCARD_HOST, split, records))
    assert [(d.kind, d.sni, d.action, d.index) for d in decisions] == [("tls", WILDCARD_HOST, "block", 0)]
    assert decisions[0].alpn == ("h2", "http/1.1") and decisions[0].tls_version == "TLSv1.3"
    assert decisions[0].to_json()["sni"] == WILDCARD_HOST


def test_tls_wildcard_apex_is_allowed(engine: Engine) -> None:
    decisions, _ = replay_bytes(engine, tls_conv(APEX_OF_WILDCARD))
    assert [d.action for d in decisions] == ["allow"]


def test_non_tls_bytes_on_443_do_not_crash(engine: Engine) -> None:
    c = Conversation(server=("203.0.113.5", 443)).handshake().send(True, b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")
    decisions, rp = replay_bytes(engine, pcap_bytes(c.close().packets()))
    assert rp.stats.tls_errors == 1
    assert all(d.action == "allow" for d in decisions)


# ---------------------------------------------------------------------------
# DNS


def dns_pair(qname: str, qid: int, cname: str | None = None, port: int = 5300, t: int = 0) -> list[tuple[int, bytes]]:
    q = dnslib.DNSRecord.question(qname)
    q.header.id = qid
    a = q.reply()
    owner = qname
    if cname:
        a.add_answer(dnslib.RR(qname, dnslib.QTYPE.CNAME, rdata=dnslib.CNAME(cname)))
        owner = cname
    a.add_answer(dnslib.RR(owner, dnslib.QTYPE.A, rdata=dnslib.A("203.0.113.9")))
    ts = 1_700_000_000_000_000 + t
    cl, srv = ("192.0.2.7", port), ("198.51.100.53", 53)
    return [udp_packet(cl, srv, q.pack(), ts), udp_packet(srv, cl, a.pack(), ts + 500)]


def test_dns_qname_and_cname_chain(engine: Engine) -> None:
    pkts = (dns_pair("WWW.Example.com", 1) + dns_pair(BLOCKED_HOST.upper(), 2, port=5301, t=10)
            + dns_pair("cdn.example.net", 3, cname="edge." + WILDCARD_HOST, port=5302, t=20)
            + dns_pair(APEX_OF_WILDCARD, 4, port=5303, t=30))
    decisions, _ = replay_bytes(engine, pcap_bytes(pkts))
    got = {d.qname: (d.action, d.dns_id, d.qtype, d.transport) for d in decisions}
    assert got == {
        "WWW.Example.com": ("allow", 1, 1, "udp"),
        BLOCKED_HOST.upper(): ("block", 2, 1, "udp"),  # case preserved, matched case-insensitively
        "cdn.example.net": ("block", 3, 1, "udp"),
        APEX_OF_WILDCARD: ("allow", 4, 1, "udp"),
    }
    chained = next(d for d in decisions if d.qname == "cdn.example.net")
    assert [m.where for m in chained.matches] == ["cname"]
    assert chained.to_json()["qtype"] == "A"


def test_dns_query_without_answer_is_decided_at_the_end(engine: Engine) -> None:
    decisions, _ = replay_bytes(engine, pcap_bytes(dns_pair(BLOCKED_HOST, 9)[:1]))
    assert [(d.qname, d.action, d.rcode) for d in decisions] == [(BLOCKED_HOST, "block", None)]


def test_dns_malformed_then_good(engine: Engine) -> None:
    garbage = udp_packet(("192.0.2.7", 5300), ("198.51.100.53", 53), b"\x12\x34\x01\x00\x00\x01\xc0\x0c", 1)
    decisions, rp = replay_bytes(engine, pcap_bytes([garbage] + dns_pair(BLOCKED_HOST, 5)))
    assert rp.stats.dns_malformed == 1
    assert [d.action for d in decisions] == ["block"]


def test_dns_over_tcp_length_framing(engine: Engine) -> None:
    q1 = dnslib.DNSRecord.question("a.example", "AAAA")
    q1.header.id = 11
    q2 = dnslib.DNSRecord.question(BLOCKED_HOST)
    q2.header.id = 12
    a1, a2 = q1.reply().pack(), q2.reply().pack()

    def framed(m: bytes) -> bytes:
        return struct.pack("!H", len(m)) + m

    c = Conversation(server=("198.51.100.53", 53)).handshake()
    c.send(True, framed(q1.pack()) + framed(q2.pack()), mss=7)  # both in a stream cut in 7-byte pieces
    c.send(False, framed(a2) + framed(a1))  # answered out of order
    decisions, _ = replay_bytes(engine, pcap_bytes(c.close().packets()))
    assert sorted((d.dns_id, d.qname, d.action, d.transport, d.index) for d in decisions) == [
        (11, "a.example", "allow", "tcp", 0), (12, BLOCKED_HOST, "block", "tcp", 1)]
    assert next(d for d in decisions if d.dns_id == 11).to_json()["qtype"] == "AAAA"


# ---------------------------------------------------------------------------
# Records for --store


def test_records_carry_capture_time_and_community_id(engine: Engine) -> None:
    from storage.records import Conn, Dns, Http, Tls

    pkts = keepalive().packets(t0=1_750_000_000_000_000)
    rp = Replay(engine, want_conns=True)
    outs = list(rp.run(read_packets(io.BytesIO(pcap_bytes(pkts)))))
    outs += list(Replay(engine, want_conns=True).run(read_packets(io.BytesIO(tls_conv(BLOCKED_HOST)))))
    outs += list(Replay(engine, want_conns=True).run(read_packets(io.BytesIO(pcap_bytes(dns_pair(BLOCKED_HOST, 3)))))
                 )
    records = [to_record(o) for o in outs]
    kinds = {type(r) for r in records}
    assert kinds == {Conn, Http, Tls, Dns}
    http = [r for r in records if isinstance(r, Http)]
    conn = next(r for r in records if isinstance(r, Conn) and r.service == "http")
    assert {r.uid for r in http} == {conn.uid}
    assert all(r.ts >= 1_750_000_000_000_000 for r in http)
    assert conn.community_id == http[0].community_id
    from storage.communityid import community_id

    assert conn.community_id == community_id(6, "192.0.2.10", 40000, "198.51.100.20", 80)
    assert conn.close_reason == "fin" and conn.action == "block" and conn.bytes_up > 0 and conn.bytes_down > 0
    blocked = next(r for r in http if r.action == "block" and r.keyword == KEYWORD)
    assert blocked.category == "drugs" and KEYWORD in (blocked.snippet or "")
    dns = next(r for r in records if isinstance(r, Dns))
    assert dns.qname == BLOCKED_HOST and dns.rcode_name == "NOERROR" and dns.qtype_name == "A"
    tls = next(r for r in records if isinstance(r, Tls))
    assert tls.sni == BLOCKED_HOST and tls.action == "block" and tls.tls_version == "TLSv1.3"


def test_conn_summary_carries_the_name_the_client_resolved(engine: Engine) -> None:
    pkts = dns_pair("www.example.com", 1) + Conversation(client=("192.0.2.7", 41000), server=("203.0.113.9", 80)) \
        .handshake().send(True, request()).send(False, response(PAGE_ALLOW)).close().packets(t0=1_700_000_000_100_000)
    data = pcap_bytes(pkts)
    whole = [o for o in Replay(engine, want_conns=True).run(read_packets(io.BytesIO(data)))
             if isinstance(o, ConnSummary) and o.proto == "tcp"]
    assert [c.dns_name for c in whole] == ["www.example.com"]
    # Split over two shards (parallel replay), the name still reaches the conn record.
    sharded = [o for k in range(2)
               for o in Replay(engine, want_conns=True, shard=(k, 2)).run(read_packets(io.BytesIO(data)))]
    assert [o.dns_name for o in sharded if isinstance(o, ConnSummary) and o.proto == "tcp"] == ["www.example.com"]
    assert summary([o for o in sharded if isinstance(o, Decision)]) == summary(
        [o for o in Replay(engine).run(read_packets(io.BytesIO(data))) if isinstance(o, Decision)])


def test_http_framing_error_is_flagged_and_parsing_resumes(engine: Engine) -> None:
    c = Conversation().handshake()
    c.send(True, request("/ok1")).send(False, b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\nbroken")
    c.send(True, request("/ok2")).send(False, response(PAGE_BLOCK))
    decisions, rp = replay_bytes(engine, pcap_bytes(c.close().packets()))
    got = {d.url: d for d in decisions}
    assert any("Content-Length" in e for e in got["/ok1"].errors)
    assert got["/ok2"].action == "block" and got["/ok2"].status == 200
    assert rp.stats.http_errors == 1


def test_bad_request_head_keeps_its_place_in_the_order(engine: Engine) -> None:
    c = Conversation().handshake()
    c.send(True, b"GET /bad HTTP/1.1\r\nBad Header\r\n\r\n").send(False, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    c.send(True, request("/good", host=BLOCKED_HOST)).send(False, response(PAGE_ALLOW))
    decisions, _ = replay_bytes(engine, pcap_bytes(c.close().packets()))
    got = sorted((d.index, d.url, d.status, d.action, bool(d.errors)) for d in decisions)
    assert got == [(0, None, 400, "allow", True), (1, "/good", 200, "block", False)]


def test_large_body_in_one_byte_segments_is_bounded_in_time(engine: Engine) -> None:
    import time

    body = ("<p>" + "图书馆开放时间调整。" * 2500 + KEYWORD + "</p>").encode()  # ~75 KB, keyword at the end
    c = Conversation().handshake().send(True, request("/big")).send(False, response(body), mss=1)
    data = pcap_bytes(c.close().packets())
    start = time.monotonic()
    decisions, _ = replay_bytes(engine, data)
    assert time.monotonic() - start < 60
    assert [(d.url, d.action, d.resp_bytes) for d in decisions] == [("/big", "block", len(body))]


def test_corrupted_packets_never_raise(engine: Engine, corpus: Path) -> None:
    """Bytes flipped anywhere inside packet data (headers, TCP, HTTP, TLS, DNS):
    the replay decides what it can and never raises (only damaged *file* structure
    may raise CaptureError, and record headers are left intact here)."""
    from proxy.pcap import CaptureStats

    data = (corpus / "pcap" / "capture.pcap").read_bytes()
    # Offsets of the packet bytes of each record (record headers stay valid).
    spans = []
    pos = 24
    while pos + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, pos + 8)[0]
        spans.append((pos + 16, pos + 16 + caplen))
        pos += 16 + caplen
    rnd = random.Random(11)
    for _ in range(2):
        buf = bytearray(data)
        for _ in range(3000):
            a, b = spans[rnd.randrange(len(spans))]
            buf[rnd.randrange(a, b)] = rnd.randrange(256)
        rp = Replay(engine, want_conns=True)
        stats = CaptureStats()
        outs = list(rp.run(read_packets(io.BytesIO(bytes(buf)), stats)))
        assert stats.records == len(spans)
        assert sum(isinstance(o, Decision) for o in outs) > 300


def test_unanswered_dns_query_is_decided_after_the_answer_timeout(engine: Engine) -> None:
    rp = Replay(engine, limits=ReplayLimits(dns_answer_us=2_000_000, sweep_every_us=1_000_000))
    pkts = dns_pair(BLOCKED_HOST, 21)[:1] + dns_pair("a.example", 22, port=5400, t=5_000_000)
    outs = []
    for pkt in read_packets(io.BytesIO(pcap_bytes(pkts))):
        outs += rp.packet(pkt)
    # Decided on the capture clock, before the end of the capture.
    assert [(d.qname, d.action, d.rcode) for d in outs if isinstance(d, Decision)] == [
        (BLOCKED_HOST, "block", None), ("a.example", "allow", 0)]
    assert not [d for d in rp.finish() if isinstance(d, Decision)]


def test_server_bytes_held_for_a_silent_client_are_bounded(engine: Engine) -> None:
    limit = 10_000
    rp = Replay(engine, limits=ReplayLimits(max_held_response_bytes=limit))
    c = Conversation().handshake().send(False, b"x" * 50_000, mss=1000)
    held = []
    for pkt in read_packets(io.BytesIO(pcap_bytes(c.packets()))):
        rp.packet(pkt)
        held += [conn.held_bytes for conn in rp._tcp_active]
    assert max(held) <= limit + 1000
    assert rp.stats.unparsed_bytes >= 40_000


def test_dns_pending_limit_decides_the_oldest(engine: Engine) -> None:
    rp = Replay(engine, limits=ReplayLimits(max_dns_pending=4))
    pkts = []
    for i in range(10):  # ten unanswered queries on one flow
        q = dnslib.DNSRecord.question(f"q{i}.example")
        q.header.id = 100 + i
        pkts.append(udp_packet(("192.0.2.8", 5555), ("198.51.100.53", 53), q.pack(), 1_700_000_000_000_000 + i))
    outs = []
    for pkt in read_packets(io.BytesIO(pcap_bytes(pkts))):
        outs += rp.packet(pkt)
        assert all(len(f.dns_pending) <= 4 for f in rp._udp_active)
    outs += rp.finish()
    assert sorted(d.dns_id for d in outs if isinstance(d, Decision)) == list(range(100, 110))


# ---------------------------------------------------------------------------
# Parallel replay: shards merged by their OrderKeys give the single-process order


def busy_capture(seed: int = 7, conversations: int = 90) -> list[tuple[int, bytes]]:
    """A capture that exercises every ordering rule of the replay: HTTP connections
    closed, reset and left open (closed later by the idle sweep), answered and
    unanswered DNS queries, TLS, a reused 4-tuple, over 40 minutes of capture time
    (so sweeps close flows mid-capture), client ports on every shard, and a few
    packets whose timestamps go backwards."""
    rnd = random.Random(seed)
    hello = openssl_hello("www.example.com", ["http/1.1"])
    pkts: list[tuple[int, bytes]] = []
    t = 1_700_000_000_000_000
    reusable: list[tuple[str, int]] = []
    for i in range(conversations):
        t += rnd.randrange(1, 55) * 1_000_000
        kind = rnd.random()
        client = (f"192.0.2.{1 + rnd.randrange(20)}", 20000 + rnd.randrange(3000))
        if kind < 0.12 and reusable:
            client = rnd.choice(reusable)  # the same 4-tuple again: a new connection
            kind = 0.2
        if kind < 0.45:
            c = Conversation(client=client, isn_c=rnd.getrandbits(32), isn_s=rnd.getrandbits(32)).handshake()
            for k in range(rnd.randint(1, 3)):
                host = BLOCKED_HOST if rnd.random() < 0.15 else "www.example.com"
                page = PAGE_BLOCK if rnd.random() < 0.2 else PAGE_ALLOW
                c.send(True, request(f"/{i}/{k}", host=host)).send(False, response(page), mss=rnd.choice([40, 700, 1400]))
            end = rnd.random()
            if end < 0.6:
                c.close()
                reusable.append(client)
            elif end < 0.75:
                c.segs.append(Seg(True, c.c_next, c.s_next, RST | ACK))
            # else: left open, for the idle sweep (or the end of the capture)
            pkts += c.packets(t0=t)
        elif kind < 0.7:
            name = rnd.choice([BLOCKED_HOST, "a.example", "www.example.com", "cdn.example.net"])
            cname = "edge." + WILDCARD_HOST if rnd.random() < 0.2 else None
            pair = dns_pair(name, rnd.randrange(65536), cname=cname, port=client[1], t=t - 1_700_000_000_000_000)
            pkts += pair if rnd.random() < 0.8 else pair[:1]  # some never answered
        else:
            c = Conversation(client=client, server=("203.0.113.5", 443)).handshake()
            c.send(True, hello).send(False, b"\x16\x03\x03\x00\x02\x02\x00")
            pkts += c.close().packets(t0=t)
    pkts.sort(key=lambda p: p[0])
    for j in rnd.sample(range(len(pkts) - 1), len(pkts) // 40):  # capture order != timestamp order
        pkts[j], pkts[j + 1] = pkts[j + 1], pkts[j]
    return pkts


def _merged_shards(engine: Engine, data: bytes, shards: int, **kw: object) -> list[object]:
    keyed = []
    for k in range(shards):
        rp = Replay(engine, shard=(k, shards), order_marks=True, **kw)  # type: ignore[arg-type]
        keys = OrderKeys(k)
        number = 0
        for pkt in read_packets(io.BytesIO(data)):
            number += 1
            keyed += [(key, o) for o in rp.packet(pkt) if (key := keys.key(number, o)) is not None]
        keyed += [(key, o) for o in rp.finish() if (key := keys.key(1 << 62, o)) is not None]
    return [o for _, o in sorted(keyed, key=lambda ko: ko[0])]


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_merged_by_order_keys_give_the_single_process_output(engine: Engine, shards: int) -> None:
    data = pcap_bytes(busy_capture())
    limits = ReplayLimits(sweep_every_us=1_000_000)
    serial_rp = Replay(engine, want_conns=True, limits=limits)
    serial = list(serial_rp.run(read_packets(io.BytesIO(data))))
    # The capture does what it is for: flows closed by sweeps mid-capture, and by its end.
    reasons = {o.close_reason for o in serial if isinstance(o, ConnSummary)}
    assert {"timeout", "fin", "rst", "end of capture"} <= reasons
    assert sum(isinstance(o, Decision) and o.kind == "dns" and o.rcode is None for o in serial) >= 3
    merged = _merged_shards(engine, data, shards, want_conns=True, limits=limits)
    assert merged == serial


def test_order_marks_only_when_asked(engine: Engine) -> None:
    data = pcap_bytes(busy_capture(conversations=30))
    outs = list(Replay(engine, shard=(0, 2)).run(read_packets(io.BytesIO(data))))
    assert not [o for o in outs if isinstance(o, OrderMark)]
    outs = list(Replay(engine, shard=(0, 2), order_marks=True).run(read_packets(io.BytesIO(data))))
    assert [o for o in outs if isinstance(o, OrderMark)]


def test_flow_ids_can_be_left_out(engine: Engine) -> None:
    data = pcap_bytes(keepalive().packets())
    with_ids, _ = replay_bytes(engine, data)
    without, _ = replay_bytes(engine, data, flow_ids=False)
    assert all(d.uid and d.community_id for d in with_ids)
    assert all(not d.uid and not d.community_id for d in without)
    assert [d.to_json() for d in with_ids] == [d.to_json() for d in without]  # JSON lines carry neither


# ---------------------------------------------------------------------------
# DNS: the common shapes read without dnslib, and the same answer as dnslib's


def _dnslib_fields(data: bytes) -> tuple[object, ...] | None:
    """What the replay takes from dnslib (proxy/replay.py, ``_dns_message``); None: malformed."""
    try:
        msg = dnslib.DNSRecord.parse(data)
        q = msg.questions[0]
        response = bool(msg.header.qr)
        answers = msg.rr if response else []
        return (int(msg.header.id), response, int(msg.header.rcode) if response else None, _qname_text(q.qname),
                int(q.qtype), [_qname_text(rr.rdata.label) for rr in answers if rr.rtype == dnslib.QTYPE.CNAME])
    except Exception:
        return None


def _dns_samples() -> list[bytes]:
    out = []
    for name in ["a.example", "WWW.Example.com", BLOCKED_HOST, "x.y.z.example.org", "中文.example", "a\\.b.example"]:
        q = dnslib.DNSRecord.question(name, "AAAA" if len(name) % 2 else "A")
        q.header.id = len(out)
        out.append(q.pack())
        q.add_ar(dnslib.EDNS0(udp_len=1232))
        out.append(q.pack())
        r = q.reply()
        r.add_answer(dnslib.RR(name, dnslib.QTYPE.CNAME, rdata=dnslib.CNAME("edge." + WILDCARD_HOST)))
        r.add_answer(dnslib.RR("edge." + WILDCARD_HOST, rdata=dnslib.A("203.0.113.9")))
        r.add_answer(dnslib.RR("edge." + WILDCARD_HOST, dnslib.QTYPE.AAAA, rdata=dnslib.AAAA("2001:db8::9")))
        out.append(r.pack())
        nx = dnslib.DNSRecord.question(name).reply()
        nx.header.rcode = dnslib.RCODE.NXDOMAIN
        nx.add_auth(dnslib.RR(name, dnslib.QTYPE.SOA, rdata=dnslib.SOA("ns.example", "h.example", (1, 2, 3, 4, 5))))
        out.append(nx.pack())
        mx = dnslib.DNSRecord.question(name, "MX").reply()
        mx.add_answer(dnslib.RR(name, dnslib.QTYPE.MX, rdata=dnslib.MX("mail.example")))
        out.append(mx.pack())
    return out


def test_common_dns_reader_agrees_with_dnslib() -> None:
    samples = _dns_samples()
    fast = [read_common_dns(d) for d in samples]
    assert sum(f is not None for f in fast) >= 12  # the common shapes do take the fast path
    for data, got in zip(samples, fast):
        if got is not None:
            assert list(got) == list(_dnslib_fields(data) or ()), data.hex()
    # Mutated messages (bounded: 30,000 of them): whatever the fast reader accepts,
    # dnslib reads too, to the same fields; the rest goes to dnslib anyway.
    rnd = random.Random(6)
    accepted = 0
    for _ in range(30_000):
        d = bytearray(rnd.choice(samples))
        for _ in range(rnd.randint(1, 3)):
            op = rnd.random()
            if not d:
                break
            if op < 0.5:
                d[rnd.randrange(len(d))] = rnd.choice([0, 1, 5, 12, 28, 41, 63, 64, 0xC0, 0xFF, rnd.randrange(256)])
            elif op < 0.7:
                del d[rnd.randrange(len(d)) :]
            elif op < 0.85:
                i = rnd.randrange(len(d) + 1)
                d[i:i] = rnd.randbytes(rnd.randint(1, 6))
            else:
                i = rnd.randrange(len(d))
                del d[i : i + rnd.randint(1, 4)]
        got = read_common_dns(bytes(d))
        if got is not None:
            accepted += 1
            assert list(got) == list(_dnslib_fields(bytes(d)) or ()), bytes(d).hex()
    assert accepted > 1000
