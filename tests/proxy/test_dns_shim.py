"""proxy/dns_shim.py: the shim on loopback, with a real Engine, a real RecordWriter and
small authoritative upstreams written here (``Zone``), which answer only their test
zone and can be told to drop, fail or truncate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import AAAA, CNAME, EDNS0, HTTPS, QTYPE, RCODE, RR, SOA, TXT, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linewarden.config import DnsConfig
from proxy.dns_shim import DnsShim, EngineRef, strip_ech
from proxy.identity import Identity
from rules.engine import Engine
from storage.config import StoreConfig
from storage.query import query as query_store
from storage.records import Alarm, Dns
from storage.writer import RecordWriter

BAD_DNS = Path("/work/shared/corpus/bad/dns")
ZONE = "lw.test"

RULESET_TOML = """name = "dns-shim-test"
version = 7

[categories.gambling]
action = "block"

[categories.adult]
action = "block"

[categories.watch]
action = "log"
"""
DOMAINS_TSV = """id\tcategory\tdomain
g1\tgambling\tcasino.lw.test
a1\tadult\tadult.lw.test
w1\twatch\twatched.lw.test
g2\tgambling\tbadcdn.lw.test
"""


def write_rules(path: Path) -> Path:
    path.mkdir()
    (path / "ruleset.toml").write_text(RULESET_TOML)
    (path / "domains.tsv").write_text(DOMAINS_TSV)
    return path


# -- a tiny authoritative upstream -------------------------------------------------


class Zone(asyncio.DatagramProtocol):
    """Authoritative for lw.test only (REFUSED elsewhere, never recursing)."""

    def __init__(self) -> None:
        soa = SOA("ns.lw.test", "admin.lw.test", (1, 3600, 600, 86400, 30))
        big = [RR("big.lw.test", QTYPE.TXT, rdata=TXT(f"record-{i}-" + "x" * 80), ttl=300)
               for i in range(20)]
        self.records: dict[tuple[str, int], list[RR]] = {
            ("www.lw.test", QTYPE.A): [RR("www.lw.test", QTYPE.A, rdata=A("192.0.2.10"), ttl=300)],
            ("www.lw.test", QTYPE.AAAA): [RR("www.lw.test", QTYPE.AAAA, rdata=AAAA("2001:db8::10"), ttl=300)],
            ("alias.lw.test", QTYPE.A): [
                RR("alias.lw.test", QTYPE.CNAME, rdata=CNAME("www.lw.test"), ttl=300),
                RR("www.lw.test", QTYPE.A, rdata=A("192.0.2.10"), ttl=300)],
            ("via-bad.lw.test", QTYPE.A): [
                RR("via-bad.lw.test", QTYPE.CNAME, rdata=CNAME("edge.badcdn.lw.test"), ttl=300),
                RR("edge.badcdn.lw.test", QTYPE.A, rdata=A("192.0.2.66"), ttl=300)],
            ("big.lw.test", QTYPE.TXT): big,
            ("svc.lw.test", QTYPE.HTTPS): [RR("svc.lw.test", QTYPE.HTTPS, ttl=300, rdata=HTTPS.fromZone(
                ["1", ".", "alpn=h2", "echconfig=AEX+DQBBpQAgACD0", "ipv4hint=192.0.2.10"]))],
            ("short.lw.test", QTYPE.A): [RR("short.lw.test", QTYPE.A, rdata=A("192.0.2.11"), ttl=1)],
        }
        self.soa = RR(ZONE, QTYPE.SOA, rdata=soa, ttl=60)
        self.mode = "normal"  # normal | drop | servfail
        self.udp_queries = 0
        self.tcp_queries = 0
        self.transport: Any = None
        self.server: Any = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    def answer(self, data: bytes, limit: int | None) -> bytes:
        q = DNSRecord.parse(data)
        r = q.reply()
        name = str(q.q.qname).rstrip(".").lower()
        if self.mode == "servfail":
            r.header.rcode = RCODE.SERVFAIL
        elif name != ZONE and not name.endswith("." + ZONE):
            r.header.rcode = RCODE.REFUSED
        else:
            rrs = self.records.get((name, q.q.qtype))
            if rrs:
                for rr in rrs:
                    r.add_answer(rr)
            else:
                if not any(k[0] == name for k in self.records):
                    r.header.rcode = RCODE.NXDOMAIN
                r.add_auth(self.soa)
        out = bytes(r.pack())
        if limit is not None and len(out) > limit:
            r.rr = []
            r.auth = []
            r.header.tc = 1
            out = bytes(r.pack())
        return out

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.udp_queries += 1
        if self.mode == "drop":
            return
        q = DNSRecord.parse(data)
        opt = next((x for x in q.ar if x.rtype == QTYPE.OPT), None)
        limit = max(512, opt.rclass) if opt else 512
        limit = min(limit, 1232)
        self.transport.sendto(self.answer(data, limit), addr)

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(n)
                self.tcp_queries += 1
                if self.mode == "drop":
                    continue
                out = self.answer(data, None)
                writer.write(len(out).to_bytes(2, "big") + out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # one port free for both TCP and UDP
            self.server = await asyncio.start_server(self.handle_tcp, "127.0.0.1", 0)
            port = self.server.sockets[0].getsockname()[1]
            try:
                self.transport, _ = await loop.create_datagram_endpoint(
                    lambda: self, local_addr=("127.0.0.1", port))
                break
            except OSError:
                self.server.close()
        self.address = ("127.0.0.1", port)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    async def stop(self) -> None:
        self.transport.close()
        self.server.close()


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
async def zones() -> AsyncIterator[list[Zone]]:
    zs = [Zone(), Zone()]
    for z in zs:
        await z.start()
    yield zs
    for z in zs:
        await z.stop()


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine.from_dir(write_rules(tmp_path / "rules"))


class Rig:
    def __init__(self, shim: DnsShim, writer: RecordWriter, store: Path) -> None:
        self.shim, self.writer, self.store = shim, writer, store

    async def ask(self, name: str, qtype: str = "A", *, tcp: bool = False, edns: int | None = None,
                  qid: int = 4242, raw: bytes | None = None, timeout: float = 3.0) -> DNSRecord:
        data = raw if raw is not None else make_query(name, qtype, edns=edns, qid=qid)
        out = await exchange(self.shim.udp_address if not tcp else self.shim.tcp_address, data,
                             tcp=tcp, timeout=timeout)
        return DNSRecord.parse(out)

    async def records(self) -> list[Any]:
        await self.writer.flush()
        return read_store(self.store)


def make_query(name: str, qtype: str = "A", *, edns: int | None = None, qid: int = 4242) -> bytes:
    rec = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        rec.add_ar(EDNS0(udp_len=edns))
    return bytes(rec.pack())


async def exchange(addr: Any, data: bytes, *, tcp: bool = False, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    if tcp:
        reader, writer = await asyncio.open_connection(addr[0], addr[1])
        writer.write(len(data).to_bytes(2, "big") + data)
        n = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), timeout), "big")
        out = await reader.readexactly(n)
        writer.close()
        return out
    fut: asyncio.Future[bytes] = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, d: bytes, a: Any) -> None:
            if not fut.done():
                fut.set_result(d)

    tr, _ = await loop.create_datagram_endpoint(P, remote_addr=tuple(addr))
    try:
        tr.sendto(data)
        return await asyncio.wait_for(fut, timeout)
    finally:
        tr.close()


def read_store(store: Path) -> list[Any]:
    """Every record in the store, via storage's own reader."""
    return list(query_store(store))


def cfg(**kw: Any) -> DnsConfig:
    base = dict(listen="127.0.0.1:0", timeout_ms=300, health_interval_s=0.2,
                sinkhole={"adult": ("192.0.2.80", "2001:db8::80")})
    base.update(kw)
    return DnsConfig(**base)


@pytest.fixture
async def rig(tmp_path: Path, engine: Engine, zones: list[Zone]) -> AsyncIterator[Rig]:
    store = tmp_path / "store"
    writer = RecordWriter(store, StoreConfig(commit_interval_ms=20))
    await writer.start()
    ident = Identity.from_config([{"ip": "127.0.0.1", "account": "alice", "mac": "02:00:00:00:00:01"}])
    shim = DnsShim(cfg(), EngineRef(engine), writer, ident,
                   upstreams=[zones[0].address, zones[1].address])
    await shim.start()
    yield Rig(shim, writer, store)
    await shim.stop()
    await writer.close()


def dns_records(records: list[Any]) -> list[Dns]:
    return [r for r in records if isinstance(r, Dns)]


# -- behaviour --------------------------------------------------------------------


async def test_allowed_name_resolves_and_is_recorded(rig: Rig, zones: list[Zone]) -> None:
    r = await rig.ask("www.lw.test", qid=777)
    assert r.header.rcode == 0 and r.header.id == 777 and [str(x.rdata) for x in r.rr] == ["192.0.2.10"]
    [rec] = dns_records(await rig.records())
    assert (rec.qname, rec.qtype, rec.qtype_name, rec.dns_id, rec.transport) == ("www.lw.test", 1, "A", 777, "udp")
    assert (rec.rcode, rec.rcode_name, rec.answers, rec.action) == (0, "NOERROR", ["192.0.2.10"], "allow")
    assert rec.account == "alice" and rec.client_mac == "02:00:00:00:00:01"
    assert rec.client_ip == "127.0.0.1" and rec.client_port and rec.ruleset_version == 7
    assert rec.server_ip == "127.0.0.1" and rec.server_port == zones[0].address[1]
    assert rec.nat_ip == "127.0.0.1" and rec.nat_port and not rec.cache_hit
    assert rec.latency_us is not None and rec.latency_us >= 0 and rec.uid


async def test_second_query_is_a_cache_hit_with_the_clients_id_and_case(rig: Rig, zones: list[Zone]) -> None:
    await rig.ask("www.lw.test", qid=1)
    asked = zones[0].udp_queries
    r = await rig.ask("WWW.Lw.TEST", qid=2)
    assert zones[0].udp_queries == asked  # not asked again
    assert r.header.id == 2 and str(r.q.qname) == "WWW.Lw.TEST." and str(r.rr[0].rdata) == "192.0.2.10"
    assert 299 <= r.rr[0].ttl <= 300
    recs = dns_records(await rig.records())
    assert [x.cache_hit for x in recs] == [False, True] and recs[1].qname == "WWW.Lw.TEST"
    assert recs[1].answers == ["192.0.2.10"]


async def test_repeated_hits_get_records_of_their_own_from_the_prototype(rig: Rig, zones: list[Zone]) -> None:
    """Hits after the first copy the previous hit's record (RECORD_MEMO_MAX): every
    per-query field is still the query's own, and a different case is its own prototype."""
    await rig.ask("www.lw.test", qid=1)
    for qid in (2, 3, 4):
        await rig.ask("www.lw.test", qid=qid)
    await rig.ask("WWW.lw.test", qid=5)
    recs = dns_records(await rig.records())
    hits = recs[1:]
    assert [x.dns_id for x in hits] == [2, 3, 4, 5] and all(x.cache_hit for x in hits)
    assert len({x.uid for x in recs}) == 5 and len({x.client_port for x in hits}) == 4
    assert [x.qname for x in hits] == ["www.lw.test"] * 3 + ["WWW.lw.test"]
    assert [x.ts for x in hits] == sorted(x.ts for x in hits) and all(x.latency_us is not None for x in hits)
    assert all(x.answers == ["192.0.2.10"] and x.server_ip is None and x.rcode_name == "NOERROR" for x in hits)
    assert len(rig.shim._protos) == 2


async def test_listed_name_gets_nxdomain_and_an_alarm_without_asking_upstream(rig: Rig, zones: list[Zone]) -> None:
    r = await rig.ask("www.casino.lw.test")
    assert r.header.rcode == RCODE.NXDOMAIN and r.rr == []
    assert zones[0].udp_queries == 0 and zones[1].udp_queries == 0
    records = await rig.records()
    [rec] = dns_records(records)
    assert rec.action == "block" and rec.rule_ids == ["g1"] and rec.rcode_name == "NXDOMAIN"
    [alarm] = [x for x in records if isinstance(x, Alarm)]
    assert alarm.alarm_kind == "illegal_content" and "casino.lw.test" in (alarm.detail or "")
    assert alarm.uid == rec.uid and alarm.account == "alice"


async def test_sinkhole_category_answers_the_block_page_address(rig: Rig) -> None:
    a = await rig.ask("adult.lw.test", "A")
    assert [str(x.rdata) for x in a.rr] == ["192.0.2.80"] and a.rr[0].ttl == 60
    aaaa = await rig.ask("x.adult.lw.test", "AAAA")
    assert [str(x.rdata) for x in aaaa.rr] == ["2001:db8::80"]
    https = await rig.ask("adult.lw.test", "HTTPS")
    assert https.header.rcode == 0 and https.rr == []  # NODATA: the client falls back to A
    recs = dns_records(await rig.records())
    assert [x.answers for x in recs] == [["192.0.2.80"], ["2001:db8::80"], []]
    assert all(x.action == "block" for x in recs)


async def test_log_category_resolves_and_records_the_rule(rig: Rig) -> None:
    r = await rig.ask("watched.lw.test")  # not in the zone upstream: NXDOMAIN
    assert r.header.rcode == RCODE.NXDOMAIN
    [rec] = dns_records(await rig.records())
    assert rec.action == "log" and rec.rule_ids == ["w1"]


async def test_cname_chain_through_listed_name_is_blocked(rig: Rig) -> None:
    r = await rig.ask("via-bad.lw.test")
    assert r.header.rcode == RCODE.NXDOMAIN and r.rr == []
    again = await rig.ask("via-bad.lw.test")  # from the cache: still blocked
    assert again.header.rcode == RCODE.NXDOMAIN
    recs = dns_records(await rig.records())
    assert [x.rule_ids for x in recs] == [["g2"], ["g2"]]
    assert [x.cache_hit for x in recs] == [False, True]
    ok = await rig.ask("alias.lw.test")
    assert [str(x.rdata) for x in ok.rr] == ["www.lw.test.", "192.0.2.10"]


async def test_truncated_over_udp_then_tcp_retry_works(rig: Rig, zones: list[Zone]) -> None:
    udp = await rig.ask("big.lw.test", "TXT")
    assert udp.header.tc == 1 and udp.rr == []
    assert zones[0].tcp_queries == 1  # the shim itself fetched the whole answer over TCP
    tcp = await rig.ask("big.lw.test", "TXT", tcp=True)
    assert tcp.header.tc == 0 and len(tcp.rr) == 20
    recs = dns_records(await rig.records())
    assert [x.transport for x in recs] == ["udp", "tcp"] and len(recs[1].answers) == 20


async def test_edns_client_gets_the_large_answer_over_udp_with_opt(rig: Rig) -> None:
    r = await rig.ask("big.lw.test", "TXT", edns=4096)
    assert r.header.tc == 0 and len(r.rr) == 20
    assert [x.rtype for x in r.ar] == [QTYPE.OPT]


async def test_aaaa_and_https_pass_and_ech_is_stripped(rig: Rig) -> None:
    aaaa = await rig.ask("www.lw.test", "AAAA")
    assert [str(x.rdata) for x in aaaa.rr] == ["2001:db8::10"]
    https = await rig.ask("svc.lw.test", "HTTPS")
    text = str(https.rr[0].rdata)
    assert "alpn=h2" in text and "ipv4hint=192.0.2.10" in text and "ech" not in text
    assert rig.shim.stats["ech_stripped"] == 1


async def test_ech_kept_when_switched_off(tmp_path: Path, engine: Engine, zones: list[Zone]) -> None:
    writer = RecordWriter(tmp_path / "s2")
    shim = DnsShim(cfg(strip_ech=False), EngineRef(engine), writer, upstreams=[zones[0].address])
    await shim.start()
    try:
        out = DNSRecord.parse(await exchange(shim.udp_address, make_query("svc.lw.test", "HTTPS")))
        assert "echconfig=" in str(out.rr[0].rdata)
    finally:
        await shim.stop()


def test_strip_ech_also_edits_mandatory() -> None:
    q = DNSRecord.question("svc.lw.test", "HTTPS")
    r = q.reply()
    r.add_answer(RR("svc.lw.test", QTYPE.HTTPS, ttl=60, rdata=HTTPS.fromZone(
        ["1", ".", "mandatory=echconfig", "echconfig=AEX+DQBBpQAgACD0", "alpn=h2"])))
    out = DNSRecord.parse(strip_ech(bytes(r.pack())))
    assert str(out.rr[0].rdata) == "1 . alpn=h2"
    assert strip_ech(bytes(q.reply().pack())) is None


async def test_failover_to_second_upstream_when_first_drops(rig: Rig, zones: list[Zone]) -> None:
    zones[0].mode = "drop"
    r = await rig.ask("www.lw.test")
    assert str(r.rr[0].rdata) == "192.0.2.10"
    assert zones[0].udp_queries == 1 and zones[1].udp_queries == 1
    [rec] = dns_records(await rig.records())
    assert rec.server_port == zones[1].address[1]


async def test_refused_by_one_upstream_fails_over(rig: Rig, zones: list[Zone]) -> None:
    zones[0].mode = "servfail"
    r = await rig.ask("www.lw.test")
    assert r.header.rcode == 0 and str(r.rr[0].rdata) == "192.0.2.10"


async def test_servfail_only_when_every_upstream_failed(rig: Rig, zones: list[Zone]) -> None:
    for z in zones:
        z.mode = "drop"
    r = await rig.ask("www.lw.test")
    assert r.header.rcode == RCODE.SERVFAIL
    [rec] = dns_records(await rig.records())
    assert rec.rcode_name == "SERVFAIL"


async def test_upstream_marked_down_then_back_after_probe(rig: Rig, zones: list[Zone]) -> None:
    zones[0].mode = "drop"
    for i in range(3):
        await rig.ask(f"n{i}.lw.test")
    up0 = rig.shim.upstreams[0]
    assert up0.down
    before = zones[0].udp_queries
    await rig.ask("n9.lw.test")  # a down upstream is tried last: the answer comes at once
    assert zones[0].udp_queries == before
    zones[0].mode = "normal"
    for _ in range(200):  # probes every 0.2 s; generous for a loaded machine
        if not up0.down:
            break
        await asyncio.sleep(0.05)
    assert not up0.down


async def test_negative_answers_are_cached_per_rfc2308(rig: Rig, zones: list[Zone]) -> None:
    await rig.ask("missing.lw.test")
    asked = zones[0].udp_queries
    r = await rig.ask("missing.lw.test")
    assert r.header.rcode == RCODE.NXDOMAIN and zones[0].udp_queries == asked
    assert 0 < r.auth[0].ttl <= 30  # min(SOA TTL 60, MINIMUM 30)


async def test_tcp_pipelined_queries_are_all_answered(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection(*rig.shim.tcp_address)
    msgs = [make_query("www.lw.test", qid=10), make_query("casino.lw.test", qid=11),
            make_query("alias.lw.test", qid=12)]
    writer.write(b"".join(len(m).to_bytes(2, "big") + m for m in msgs))
    got = {}
    for _ in msgs:
        n = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
        r = DNSRecord.parse(await reader.readexactly(n))
        got[r.header.id] = r.header.rcode
    writer.close()
    assert got == {10: 0, 11: RCODE.NXDOMAIN, 12: 0}


async def test_malformed_packets_get_formerr_or_are_dropped_and_counted(rig: Rig) -> None:
    sent = answered = 0
    for path in sorted(BAD_DNS.glob("*.bin")):
        data = path.read_bytes()
        sent += 1
        try:
            out = await exchange(rig.shim.udp_address, data, timeout=0.3)
        except (asyncio.TimeoutError, TimeoutError):
            continue
        answered += 1
        assert DNSRecord.parse(out).header.rcode in (RCODE.FORMERR, RCODE.NOTIMP, 0, RCODE.NXDOMAIN, RCODE.SERVFAIL,
                                                    RCODE.REFUSED)  # the last: asked upstream
    assert answered >= 1
    stats = rig.shim.stats
    assert stats["malformed"] >= 1 and stats["dropped"] >= 1 and stats["internal_errors"] == 0
    r = await rig.ask("www.lw.test")  # still serving
    assert str(r.rr[0].rdata) == "192.0.2.10"


async def test_odd_but_valid_queries_take_the_slow_path(rig: Rig) -> None:
    q = DNSRecord(DNSHeader(id=5, rd=1, opcode=2), q=DNSQuestion("www.lw.test"))  # STATUS
    assert (await rig.ask("", raw=bytes(q.pack()))).header.rcode == RCODE.NOTIMP
    q = DNSRecord(DNSHeader(id=6, rd=1), q=DNSQuestion("www.lw.test"))
    q.add_ar(EDNS0(version=1))
    r = await rig.ask("", raw=bytes(q.pack()))
    assert r.header.rcode == 0 and r.ar[0].ttl >> 24 == 1  # BADVERS = 16: ext-rcode 1
    q = DNSRecord(DNSHeader(id=7, rd=1), q=DNSQuestion("www.lw.test"))
    q.add_ar(RR("x.lw.test", QTYPE.A, rdata=A("192.0.2.1")))  # a stray additional record
    r = await rig.ask("", raw=bytes(q.pack()))
    assert str(r.rr[0].rdata) == "192.0.2.10" and rig.shim.stats["slow_path"] == 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_fuzz_handler_never_raises(tmp_path_factory: Any, data: bytes) -> None:
    shim = _offline_shim(tmp_path_factory)
    out: list[bytes] = []
    asyncio.run(_feed(shim, data, out))
    assert shim.stats["internal_errors"] == 0
    for resp in out:
        assert resp[:2] == data[:2]


_SHIMS: dict[str, DnsShim] = {}


def _offline_shim(tmp_path_factory: Any) -> DnsShim:
    if "s" not in _SHIMS:
        rules = write_rules(tmp_path_factory.mktemp("fz") / "rules")
        writer = RecordWriter(tmp_path_factory.mktemp("fzs"), StoreConfig(queue_max=1_000_000))
        _SHIMS["s"] = DnsShim(cfg(), EngineRef(Engine.from_dir(rules)), writer, upstreams=[])
    return _SHIMS["s"]


async def _feed(shim: DnsShim, data: bytes, out: list[bytes]) -> None:
    # No upstreams: allowed names get SERVFAIL, listed ones NXDOMAIN, junk FORMERR/drop.
    shim._on_message(data, ("127.0.0.1", 5555), "udp", out.append)
    shim._on_message(data, ("127.0.0.1", 5555), "tcp", out.append)


async def test_fail_closed_overflow_answers_servfail(tmp_path: Path, engine: Engine, zones: list[Zone]) -> None:
    writer = RecordWriter(tmp_path / "fc", StoreConfig(queue_max=1, overflow="fail-closed"))
    shim = DnsShim(cfg(), EngineRef(engine), writer, upstreams=[zones[0].address])
    await shim.start()
    try:
        first = DNSRecord.parse(await exchange(shim.udp_address, make_query("www.lw.test")))
        second = DNSRecord.parse(await exchange(shim.udp_address, make_query("www.lw.test")))
        assert first.header.rcode == 0 and second.header.rcode == RCODE.SERVFAIL
        assert shim.stats["unrecorded"] == 1
    finally:
        await shim.stop()


async def test_engine_swap_takes_effect_on_the_next_query(rig: Rig, tmp_path: Path) -> None:
    assert (await rig.ask("www.lw.test")).header.rcode == 0
    rules = tmp_path / "rules2"
    rules.mkdir()
    (rules / "ruleset.toml").write_text(RULESET_TOML.replace("version = 7", "version = 8"))
    (rules / "domains.tsv").write_text(DOMAINS_TSV + "g9\tgambling\twww.lw.test\n")
    rig.shim.engine.swap(Engine.from_dir(rules))
    r = await rig.ask("www.lw.test")  # cached answer, but the new rules decide
    assert r.header.rcode == RCODE.NXDOMAIN
    recs = dns_records(await rig.records())
    assert [x.ruleset_version for x in recs] == [7, 8]


async def test_stop_answers_in_flight_queries_with_servfail_and_records_them(
        tmp_path: Path, engine: Engine, zones: list[Zone]) -> None:
    zones[0].mode = "drop"
    store = tmp_path / "st"
    writer = RecordWriter(store, StoreConfig(commit_interval_ms=20))
    await writer.start()
    shim = DnsShim(cfg(timeout_ms=5000), EngineRef(engine), writer, upstreams=[zones[0].address])
    await shim.start()
    task = asyncio.create_task(exchange(shim.udp_address, make_query("www.lw.test"), timeout=3))
    await asyncio.sleep(0.2)
    await shim.stop()
    assert DNSRecord.parse(await task).header.rcode == RCODE.SERVFAIL
    await writer.close()
    [rec] = dns_records(read_store(store))
    assert rec.rcode_name == "SERVFAIL"


async def test_start_failure_leaves_nothing_bound(tmp_path: Path, engine: Engine) -> None:
    import socket

    # A port free for TCP too (so a stray user of the TCP port cannot fail the probe),
    # whose UDP side is taken: the shim's start must fail and release what it bound.
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(50):
        reserve = socket.socket()
        reserve.bind(("127.0.0.1", 0))
        port = reserve.getsockname()[1]
        try:
            taken.bind(("127.0.0.1", port))
            break
        except OSError:
            continue
        finally:
            reserve.close()
    writer = RecordWriter(tmp_path / "s")
    shim = DnsShim(cfg(listen=f"127.0.0.1:{port}"), EngineRef(engine), writer, upstreams=[])
    try:
        with pytest.raises(OSError):
            await shim.start()
        probe = socket.socket()
        # SO_REUSEADDR: an outgoing connection that happens to use this local port
        # does not count; only a listener (the shim's TCP side) would still refuse.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # the TCP side was released again
        probe.listen()
        probe.close()
    finally:
        taken.close()


async def test_malformed_pcap_packets_never_stop_the_shim(rig: Rig) -> None:
    """The corpus capture of malformed DNS packets, fed as the UDP payloads they are."""
    import dpkt

    payloads = []
    with open(BAD_DNS / "malformed.pcap", "rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(ip.data, dpkt.udp.UDP):
                payloads.append(bytes(ip.data.data))
    assert len(payloads) >= 10
    out: list[bytes] = []
    for p in payloads:
        rig.shim._on_message(p, ("127.0.0.1", 9), "udp", out.append)
    await asyncio.sleep(0.5)  # any that looked like questions went upstream and came back
    assert rig.shim.stats["internal_errors"] == 0 and rig.shim.stats["malformed"] >= 10
    r = await rig.ask("www.lw.test")
    assert str(r.rr[0].rdata) == "192.0.2.10"


@pytest.mark.parametrize("name", ["use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com",
                                  "dns.google", "cloudflare-dns.com"])
async def test_sample_rules_close_the_doh_and_private_relay_bypasses(tmp_path: Path, name: str) -> None:
    """Issue 5: the bundled rules answer NXDOMAIN for Firefox's canary domain, Apple's
    Private Relay names and well-known DoH endpoints."""
    from rules.engine import SAMPLE_RULES

    writer = RecordWriter(tmp_path / "s")
    shim = DnsShim(cfg(), EngineRef(Engine.from_dir(SAMPLE_RULES)), writer, upstreams=[])
    out: list[bytes] = []
    shim._on_message(make_query(name), ("127.0.0.1", 9), "udp", out.append)
    [resp] = out
    assert DNSRecord.parse(resp).header.rcode == RCODE.NXDOMAIN
