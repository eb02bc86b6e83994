"""proxy/dns_fastpath.py: the hand-written query parser, the response walker, rendering."""

from __future__ import annotations

from pathlib import Path

import pytest
from dnslib import AAAA, CNAME, EDNS0, HTTPS, QTYPE, RR, SOA, TXT, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import dns_fastpath as fp

BAD_DNS = Path("/work/shared/corpus/bad/dns")


def query(name: str = "www.Example.test", qtype: str = "A", *, edns: int | None = None,
          do: bool = False, qid: int = 0x1234) -> bytes:
    rec = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        rec.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return bytes(rec.pack())


def response(q: bytes, *answers: RR, auth: tuple[RR, ...] = (), rcode: int = 0,
             edns: bool = False) -> bytes:
    rec = DNSRecord.parse(q).reply()
    rec.ar = []
    rec.header.rcode = rcode
    for a in answers:
        rec.add_answer(a)
    for a in auth:
        rec.add_auth(a)
    if edns:
        rec.add_ar(EDNS0(udp_len=1232))
    return bytes(rec.pack())


# -- parse_query ---------------------------------------------------------------


def test_parse_query_reads_header_question_and_keeps_case() -> None:
    q = fp.parse_query(query("www.Example.test", "AAAA"))
    assert (q.id, q.qname, q.qtype, q.qclass) == (0x1234, "www.Example.test", 28, 1)
    assert not q.edns and q.udp_size == 512
    assert q.key == query("www.example.test", "AAAA")[12:] + b"\x00"


def test_parse_query_edns_sets_size_do_and_key() -> None:
    q = fp.parse_query(query(edns=1232, do=True))
    assert q.edns and q.do and q.udp_size == 1232
    assert q.key.endswith(b"\x03")
    assert fp.parse_query(query(edns=100)).udp_size == 512  # RFC 6891 6.2.5: below 512 means 512
    assert fp.parse_query(query(edns=65000)).udp_size == fp.MAX_UDP_SIZE


def test_parse_query_same_as_dnslib_for_generated_names() -> None:
    for name in ["a.b", "x" * 63 + ".test", "UPPER.lower.Mixed", "_srv._tcp.example.test", "."]:
        data = query(name)
        q = fp.parse_query(data)
        assert q.qname == str(DNSRecord.parse(data).q.qname).rstrip(".")


def test_parse_query_escapes_odd_octets() -> None:
    data = bytearray(query("abc.test"))
    data[14] = ord(".")  # a dot inside the first label
    assert fp.parse_query(bytes(data)).qname == "a\\046c.test"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d[:7], fp.FormatError),                       # truncated header
        (lambda d: d[:15], fp.FormatError),                      # truncated name
        (lambda d: d[:-2], fp.FormatError),                      # missing qclass
        (lambda d: d + b"junk", fp.FormatError),                 # trailing bytes
        (lambda d: d[:2] + b"\x81\x00" + d[4:], fp.FormatError),  # QR set
        (lambda d: d[:2] + b"\x28\x00" + d[4:], fp.Decline),     # opcode UPDATE
        (lambda d: d[:4] + b"\x00\x02" + d[6:], fp.Decline),     # two questions
        (lambda d: d[:12] + b"\xc0\x0c" + d[-4:], fp.FormatError),  # pointer in the question
        (lambda d: d[:12] + b"\x40" + d[13:], fp.FormatError),   # label type 0x40
    ],
)
def test_parse_query_rejects(mutate, expected) -> None:
    with pytest.raises(expected):
        fp.parse_query(mutate(query()))


def test_parse_query_declines_edns_version_1_and_extra_records() -> None:
    rec = DNSRecord.parse(query(edns=1232))
    rec.ar[0].ttl = 1 << 16  # version 1
    with pytest.raises(fp.Decline):
        fp.parse_query(bytes(rec.pack()))


def test_label_over_63_and_name_over_255_are_format_errors() -> None:
    long_label = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"
    with pytest.raises(fp.FormatError):
        fp.parse_query(long_label)
    long_name = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01"
    with pytest.raises(fp.FormatError):
        fp.parse_query(long_name)


@pytest.mark.parametrize("path", sorted(BAD_DNS.glob("*.bin")), ids=lambda p: p.name)
def test_corpus_bad_dns_is_rejected_cleanly(path: Path) -> None:
    data = path.read_bytes()
    try:
        fp.parse_query(data)
    except (fp.FormatError, fp.Decline):
        pass
    resp = fp.header_only(data, fp.FORMERR)
    if len(data) < 12:
        assert resp is None
    elif resp is not None:
        assert DNSRecord.parse(resp).header.rcode == fp.FORMERR
    try:
        fp.walk_response(data)
    except fp.FormatError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parse_and_walk_only_raise_their_errors_on_garbage(data: bytes) -> None:
    try:
        fp.parse_query(data)
    except (fp.FormatError, fp.Decline):
        pass
    try:
        fp.walk_response(data)
    except fp.FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 300))
def test_mutated_queries_only_raise_their_errors(junk: bytes, at: int) -> None:
    base = query("mutate.example.test", edns=1232)
    at = at % len(base)
    data = base[:at] + junk + base[at + len(junk):]
    try:
        fp.parse_query(data)
    except (fp.FormatError, fp.Decline):
        pass


# -- walk_response -------------------------------------------------------------


def test_walk_response_finds_answers_cnames_and_ttl() -> None:
    q = query("alias.example.test")
    r = response(q, RR("alias.example.test", QTYPE.CNAME, rdata=CNAME("www.example.test"), ttl=300),
                 RR("www.example.test", QTYPE.A, rdata=A("192.0.2.10"), ttl=60))
    info = fp.walk_response(r)
    assert info.answers == ["www.example.test", "192.0.2.10"]
    assert info.cnames == ["www.example.test"]
    assert info.ttl == 60 and info.rcode == 0 and not info.needs_dnslib
    assert len(info.ttl_offsets) == 2


def test_walk_response_negative_ttl_is_min_of_soa_ttl_and_minimum() -> None:
    q = query("nope.example.test")
    soa = RR("example.test", QTYPE.SOA, ttl=600,
             rdata=SOA("ns.example.test", "admin.example.test", (1, 3600, 600, 86400, 120)))
    info = fp.walk_response(response(q, auth=(soa,), rcode=3))
    assert info.rcode == fp.NXDOMAIN and info.ttl == 120
    assert fp.walk_response(response(q, rcode=3)).ttl is None  # no SOA: do not cache


def test_walk_response_cuts_opt_and_keeps_ttl_offsets_right() -> None:
    q = query("www.example.test", edns=1232)
    r = response(q, RR("www.example.test", QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=77), edns=True)
    info = fp.walk_response(r)
    parsed = DNSRecord.parse(info.body)
    assert parsed.ar == [] and parsed.rr[0].ttl == 77
    assert fp.U32.unpack_from(info.body, info.ttl_offsets[0])[0] == 77
    assert info.answers == ["2001:db8::1"]


def test_walk_response_flags_types_needing_dnslib_and_svcb() -> None:
    q = query("t.example.test", "TXT")
    info = fp.walk_response(response(q, RR("t.example.test", QTYPE.TXT, rdata=TXT("hi"))))
    assert info.needs_dnslib
    q = query("h.example.test", "HTTPS")
    https = HTTPS.fromZone(["1", ".", "alpn=h2"])
    assert fp.walk_response(response(q, RR("h.example.test", QTYPE.HTTPS, rdata=https))).has_svcb


def _cname_response(rdata_of: "callable") -> bytes:
    q = bytearray(query("a.test"))
    q[2], q[3], q[7] = 0x81, 0x80, 1  # QR, RA, ancount 1
    at = len(q) + 12  # where the CNAME's rdata starts
    rdata = rdata_of(at)
    return bytes(q) + b"\xc0\x0c" + fp.RR_FIXED.pack(fp.T_CNAME, 1, 60, len(rdata)) + rdata


@pytest.mark.parametrize(
    "rdata_of",
    [lambda at: bytes([0xC0 | at >> 8, at & 0xFF]),  # points at itself: a loop
     lambda at: b"\xc0\xff",                         # points forward, out of bounds
     lambda at: b"\xc0"],                             # pointer cut in half
    ids=["self-loop", "forward", "truncated"],
)
def test_walk_response_rejects_bad_pointers_in_cname(rdata_of) -> None:
    with pytest.raises(fp.FormatError):
        fp.walk_response(_cname_response(rdata_of))


def test_walk_response_follows_a_good_backward_pointer() -> None:
    info = fp.walk_response(_cname_response(lambda at: b"\x03www\xc0\x0c"))
    assert info.cnames == ["www.a.test"]


def test_read_name_pointer_loop_is_format_error() -> None:
    data = b"\x00" * 12 + b"\xc0\x0e\xc0\x0c"
    with pytest.raises(fp.FormatError):
        fp.read_name(data, 12)


# -- rendering -------------------------------------------------------------------


def _cached(name: str = "www.example.test", ttl: int = 300, edns: bool = True) -> fp.CachedWire:
    q = query(name, edns=1232 if edns else None)
    r = response(q, RR(name, QTYPE.A, rdata=A("192.0.2.10"), ttl=ttl), edns=edns)
    return fp.CachedWire(fp.walk_response(r), now=1000.0)


def test_render_rewrites_id_and_decrements_ttls() -> None:
    wire = _cached()
    data = query("www.example.test", qid=0xBEEF)
    out = DNSRecord.parse(wire.render(data, fp.parse_query(data), now=1010.5))
    assert out.header.id == 0xBEEF and out.rr[0].ttl == 290 and out.ar == []
    out = DNSRecord.parse(wire.render(data, fp.parse_query(data), now=2000.0))
    assert out.rr[0].ttl == 0


def test_render_restores_client_case_and_edns() -> None:
    wire = _cached()
    data = query("WwW.ExAmPlE.test", edns=4096, do=True, qid=7)
    raw = wire.render(data, fp.parse_query(data), now=1000.0)
    out = DNSRecord.parse(raw)
    assert str(out.q.qname) == "WwW.ExAmPlE.test."
    assert len(out.ar) == 1 and out.ar[0].rtype == QTYPE.OPT and out.ar[0].rclass == fp.OUR_EDNS_SIZE
    assert out.ar[0].ttl & 0x8000  # DO echoed


def test_render_without_edns_has_no_opt_even_if_upstream_sent_one() -> None:
    wire = _cached(edns=True)
    data = query("www.example.test")
    assert DNSRecord.parse(wire.render(data, fp.parse_query(data), 1000.0)).ar == []


def test_builders_make_valid_answers() -> None:
    data = query("blocked.example.test", "A", edns=1232)
    q = fp.parse_query(data)
    nx = DNSRecord.parse(fp.build_rcode(data, q, fp.NXDOMAIN))
    assert nx.header.rcode == fp.NXDOMAIN and nx.header.qr and len(nx.ar) == 1
    hole = DNSRecord.parse(fp.build_sinkhole(data, q, bytes([192, 0, 2, 80]), 60))
    assert str(hole.rr[0].rdata) == "192.0.2.80" and hole.rr[0].ttl == 60
    nodata = DNSRecord.parse(fp.build_sinkhole(data, q, None, 60))
    assert nodata.header.rcode == 0 and nodata.rr == []
    tc = DNSRecord.parse(fp.build_truncated(data, q))
    assert tc.header.tc == 1 and tc.rr == []


def test_header_only_drops_responses_and_short_packets() -> None:
    assert fp.header_only(b"\x00" * 5, fp.FORMERR) is None
    resp = response(query())
    assert fp.header_only(resp, fp.FORMERR) is None
    out = DNSRecord.parse(fp.header_only(query(qid=99), fp.FORMERR))
    assert out.header.id == 99 and out.header.rcode == fp.FORMERR


def test_repeated_query_shapes_are_memoised_with_fresh_ids() -> None:
    a = fp.parse_query(query("memo.example.test", qid=1))
    b = fp.parse_query(query("memo.example.test", qid=2))
    assert (a.id, b.id) == (1, 2) and a[1:] == b[1:]
    assert query("memo.example.test", qid=1)[2:] in fp._query_memo


def test_query_memo_stays_bounded() -> None:
    for i in range(fp.QUERY_MEMO_MAX + 10):
        fp.parse_query(query(f"n{i}.bound.test"))
    assert len(fp._query_memo) <= fp.QUERY_MEMO_MAX
