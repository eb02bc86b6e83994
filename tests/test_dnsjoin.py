"""linewarden/dnsjoin.py: the (client, address) → name join, driven without sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linewarden.dnsjoin import JOIN_MAX_AGE_S, JOIN_MIN_AGE_S, LEARN_DELAY_S, US, DnsJoin, JoinSink
from storage.records import Conn, Dns, Http
from storage.schema import Copies

T0 = 1_700_000_000 * US


def dns(qname: str, answers: list[str], *, client: str = "10.0.0.5", qtype: int = 1, ts: int = T0) -> Dns:
    return Dns(ts=ts, client_ip=client, client_port=5000, qname=qname, qtype=qtype, rcode=0,
               answers=answers)


def conn(server: str, *, client: str = "10.0.0.5", ts: int = T0 + US, name: str | None = None) -> Conn:
    return Conn(ts=ts, uid="C1", client_ip=client, client_port=40000, server_ip=server,
                server_port=443, ts_end=ts + 10 * US, dns_name=name)


def test_a_conn_gets_the_name_its_client_resolved_to_the_address() -> None:
    j = DnsJoin()
    assert j.feed(dns("www.example.com", ["93.184.216.34"]), T0) is not None
    out = j.feed(conn("93.184.216.34"), T0 + 20 * US)
    assert isinstance(out, Conn) and out.dns_name == "www.example.com"
    assert j.named == 1


def test_the_cname_chain_leads_back_to_the_name_the_client_asked() -> None:
    j = DnsJoin()
    j.feed(dns("www.shop.test", ["shop.cdn.test", "edge.cdn.test", "192.0.2.7", "192.0.2.8"]), T0)
    assert j.name_for("10.0.0.5", "192.0.2.8", T0) == "www.shop.test"
    assert j.name_for("10.0.0.5", "shop.cdn.test", T0) is None  # a CNAME target is no address


def test_aaaa_answers_and_a_trailing_dot() -> None:
    j = DnsJoin()
    j.feed(dns("v6.example.", ["v6.cdn.example", "2001:db8::1"], qtype=28), T0)
    assert j.name_for("10.0.0.5", "2001:db8::1", T0) == "v6.example"


def test_the_join_is_per_client() -> None:
    j = DnsJoin()
    j.feed(dns("a.example", ["192.0.2.1"], client="10.0.0.5"), T0)
    assert j.name_for("10.0.0.6", "192.0.2.1", T0) is None


def test_the_last_resolution_wins() -> None:
    j = DnsJoin()
    j.feed(dns("a.example", ["192.0.2.1"]), T0)
    j.feed(dns("b.example", ["192.0.2.1"], ts=T0 + US), T0 + US)
    assert j.name_for("10.0.0.5", "192.0.2.1", T0 + 2 * US) == "b.example"


@pytest.mark.parametrize("qtype", [5, 15, 16, 65])
def test_other_query_types_teach_nothing(qtype: int) -> None:
    j = DnsJoin()
    j.feed(dns("a.example", ["192.0.2.1"], qtype=qtype), T0)
    assert not j.table


def test_an_entry_expires_after_the_capped_lifetime() -> None:
    j = DnsJoin()
    j.learn("10.0.0.5", "a.example", ["192.0.2.1"], T0)
    assert j.name_for("10.0.0.5", "192.0.2.1", T0 + JOIN_MAX_AGE_S * US) == "a.example"
    assert j.name_for("10.0.0.5", "192.0.2.1", T0 + JOIN_MAX_AGE_S * US + 1) is None


@pytest.mark.parametrize("ttl, life", [(5, JOIN_MIN_AGE_S), (300, 300), (10**9, JOIN_MAX_AGE_S)])
def test_a_given_ttl_is_floored_and_capped(ttl: int, life: int) -> None:
    j = DnsJoin()
    j.learn("10.0.0.5", "a.example", ["192.0.2.1"], T0, ttl_s=ttl)
    assert j.name_for("10.0.0.5", "192.0.2.1", T0 + life * US) == "a.example"
    assert j.name_for("10.0.0.5", "192.0.2.1", T0 + life * US + 1) is None


def test_past_the_table_limit_the_least_recently_resolved_quarter_is_forgotten() -> None:
    j = DnsJoin(max_entries=8)
    for i in range(8):
        j.learn("10.0.0.5", f"n{i}.example", [f"192.0.2.{i}"], T0)
    j.learn("10.0.0.5", "again.example", ["192.0.2.0"], T0)  # resolved again: now the newest
    assert len(j.table) == 8
    j.learn("10.0.0.5", "n9.example", ["192.0.2.9"], T0)  # one over: down to 6
    assert [k[1] for k in j.table] == [f"192.0.2.{i}" for i in (4, 5, 6, 7, 0, 9)]
    assert j.name_for("10.0.0.5", "192.0.2.0", T0) == "again.example"


def test_a_named_conn_and_other_records_pass_untouched() -> None:
    j = DnsJoin()
    j.feed(dns("a.example", ["192.0.2.1"]), T0)
    c = conn("192.0.2.1", name="given.example")
    assert j.feed(c, T0) is c
    h = Http(ts=T0, client_ip="10.0.0.5", server_ip="192.0.2.1", host="a.example")
    assert j.feed(h, T0) is h


def test_a_conn_that_arrives_before_its_dns_record_waits_for_it() -> None:
    """The race: the Dns record comes over another worker's channel, after the Conn."""
    j = DnsJoin(hold_s=1.0)
    c = conn("192.0.2.1", ts=T0)
    assert j.feed(c, T0 + 100_000) is None  # held
    assert j.next_release() == T0 + US
    j.feed(dns("late.example", ["192.0.2.1"], ts=T0 - 1000), T0 + 200_000)
    assert j.release(T0 + 500_000) == []  # not due yet
    (out,) = j.release(T0 + US)
    assert isinstance(out, Conn) and out.dns_name == "late.example" and not j.held


def test_an_old_unnamed_conn_is_not_held_and_a_due_one_goes_unnamed() -> None:
    j = DnsJoin(hold_s=1.0)
    c = conn("192.0.2.1", ts=T0)
    assert j.feed(c, T0 + 2 * US) is c  # long connection: its Dns record would be here by now
    assert j.feed(conn("192.0.2.2", ts=T0), T0) is None
    (out,) = j.release(T0 + US)
    assert isinstance(out, Conn) and out.dns_name is None and j.unnamed == 2


def test_the_hold_limit_lets_the_oldest_go_on() -> None:
    j = DnsJoin(hold_s=1.0, hold_max=2)
    first = conn("192.0.2.1", ts=T0)
    assert j.feed(first, T0) is None
    assert j.feed(conn("192.0.2.2", ts=T0), T0) is None
    assert j.feed(conn("192.0.2.3", ts=T0), T0) is first
    assert len(j.held) == 2
    assert len(j.drain()) == 2 and not j.held


class FakeWriter:
    def __init__(self) -> None:
        self.records: list[object] = []
        self.closed = False
        self.committed = 7

    def submit(self, r: object) -> bool:
        self.records.append(r)
        return True

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


async def test_the_sink_releases_held_conns_on_a_timer_and_on_close() -> None:
    now = [T0]
    w = FakeWriter()
    sink = JoinSink(w, DnsJoin(hold_s=0.05), clock=lambda: now[0])
    assert sink.submit(conn("192.0.2.1", ts=T0))  # held, counts as accepted
    assert w.records == []
    assert sink.submit(dns("a.example", ["192.0.2.1"]))
    now[0] = T0 + 60_000
    await asyncio.sleep(0.2)
    assert [getattr(r, "dns_name", "-") for r in w.records] == ["-", "a.example"]
    assert sink.committed == 7  # everything else is the writer's
    sink.submit(conn("192.0.2.9", ts=now[0]))
    await sink.close()
    assert w.closed and len(w.records) == 3


# -- end to end on loopback -------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_proxied_connection_is_recorded_with_the_name_resolved_through_the_shim(
        tmp_path, workers: int) -> None:  # type: ignore[no-untyped-def]
    """The client resolves site.lw.test through the shim (a CNAME to edge.lw.test, at
    127.0.0.2 where an origin listens), then fetches the address through the explicit
    proxy. DNS and HTTP run in separate worker processes (``workers=2``) or both in the
    main process (``0``); either way the conn record names site.lw.test."""
    from dnslib import A, CNAME, QTYPE, RR, DNSRecord

    from linewarden.app import App
    from linewarden.config import config_from_mapping
    from storage.query import query
    from tests.proxy.test_dns_shim import Zone, exchange, make_query, write_rules

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                     b"Connection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    origin = await asyncio.start_server(handle, "127.0.0.2", 0)
    port = origin.sockets[0].getsockname()[1]
    zone = Zone()
    zone.records[("site.lw.test", QTYPE.A)] = [
        RR("site.lw.test", QTYPE.CNAME, rdata=CNAME("edge.lw.test"), ttl=300),
        RR("edge.lw.test", QTYPE.A, rdata=A("127.0.0.2"), ttl=300)]
    await zone.start()
    cfg = config_from_mapping({
        "rules": {"dir": str(write_rules(tmp_path / "rules"))},
        "store": {"dir": str(tmp_path / "store"), "commit_interval_ms": 20},
        "http": {"listen": "127.0.0.1:0", "workers": 1 if workers else 0},
        "dns": {"listen": "127.0.0.1:0", "upstreams": [f"{zone.address[0]}:{zone.address[1]}"],
                "workers": workers},
    })
    app = App(cfg)
    await app.start()
    try:
        [dns] = [s for s in app.services if s.name == "dns"]
        [http] = [s for s in app.services if s.name == "http"]
        answer = DNSRecord.parse(await exchange(dns.udp_address, make_query("site.lw.test")))
        addr = str(answer.rr[-1].rdata)
        assert addr == "127.0.0.2"
        # At once, faster than a worker's channel flush: the race the join's hold covers.
        r, w = await asyncio.open_connection(*http.address)
        w.write(f"GET http://{addr}:{port}/ HTTP/1.1\r\nHost: site.lw.test:{port}\r\n"
                "Connection: close\r\n\r\n".encode())
        body = await asyncio.wait_for(r.read(), 10)
        w.close()
        assert body.startswith(b"HTTP/1.1 200") and body.endswith(b"hello")
    finally:
        await app.stop()
        await zone.stop()
        origin.close()
        await origin.wait_closed()
    conns = [rec for rec in query(tmp_path / "store") if isinstance(rec, Conn) and rec.server_ip == "127.0.0.2"]
    assert [(c.server_port, c.dns_name) for c in conns] == [(port, "site.lw.test")]


def test_with_no_hold_an_unnamed_conn_goes_on_at_once() -> None:
    """What the app runs without the DNS shim: no Dns record can come to name it."""
    j = DnsJoin(hold_s=0.0)
    c = conn("192.0.2.1", ts=T0)
    assert j.feed(c, T0) is c and not j.held and j.unnamed == 1


async def test_the_sink_releases_conns_due_close_together_in_one_go() -> None:
    now = [T0]
    w = FakeWriter()
    releases = []

    class CountingJoin(DnsJoin):
        def release(self, at: int) -> list:
            out = super().release(at)
            releases.append(len(out))
            return out

    sink = JoinSink(w, CountingJoin(hold_s=0.01), clock=lambda: now[0])
    for k in range(3):
        sink.submit(conn("192.0.2.1", ts=T0 + k * 1000))  # due 10, 11 and 12 ms from now
    now[0] = T0 + 20_000
    await asyncio.sleep(0.15)
    assert releases == [3] and len(w.records) == 3
    await sink.close()


def test_the_app_holds_conns_for_a_name_only_with_the_dns_shim(tmp_path) -> None:
    from linewarden.app import App
    from linewarden.config import config_from_mapping
    from linewarden.dnsjoin import JOIN_HOLD_S

    def hold(dns: bool) -> int:
        cfg = config_from_mapping({"store": {"dir": str(tmp_path / "store")}, "dns": {"enabled": dns}})
        return App(cfg).writer.join.hold_us

    assert hold(True) == int(JOIN_HOLD_S * US) and hold(False) == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 10**6), st.booleans()), max_size=30))
def test_copies_teach_the_table_what_their_records_would_have(order: list[tuple[int, int, bool]]) -> None:
    """The hit path's Copies are learnt once per prototype, later (``LEARN_DELAY_S``), or
    first thing when a record of the Python path or a Conn arrives; the table then ends
    the same as if every record had been learnt in turn (names, expiries and recency
    order). Index 4 is a Python-path record between the copies."""
    protos = [dns("a.test", ["192.0.2.1"]), dns("b.test", ["192.0.2.1", "192.0.2.2"]),
              dns("c.test", ["192.0.2.2"], client="10.0.0.6"), dns("d.test", ["cname.test"])]

    async def go() -> None:
        one_by_one, copied = JoinSink(FakeWriter()), JoinSink(FakeWriter())
        copied.writer.submit_copies = lambda c: True  # type: ignore[attr-defined]
        batch: list[tuple[Any, ...]] = []
        for k, (i, dt, cut) in enumerate(order):
            if i == 4:  # a miss: a record of the Python path
                rec = msgspec.structs.replace(protos[k % 3], ts=T0 + dt, uid=f"p{k}")
                if batch:
                    assert copied.submit_copies(Copies.of(batch))
                    batch = []
                copied.submit(rec)
                one_by_one.submit(rec)
                continue
            e = (protos[i], None, T0 + dt, f"u{k}", 1, 1, 1)
            batch.append(e)
            for rec in Copies.of([e]).records():
                one_by_one.submit(rec)
            if cut:
                assert copied.submit_copies(Copies.of(batch))
                batch = []
        if batch:
            assert copied.submit_copies(Copies.of(batch))
        await asyncio.sleep(LEARN_DELAY_S * 1.5)
        assert list(copied.join.table.items()) == list(one_by_one.join.table.items())

    asyncio.run(go())


def test_a_conn_right_after_copies_gets_their_name() -> None:
    """Copies wait up to ``LEARN_DELAY_S`` to be learnt, but a Conn never sees the table
    without them: it is named at once."""
    async def go() -> None:
        sink = JoinSink(FakeWriter())
        sink.writer.submit_copies = lambda c: True  # type: ignore[attr-defined]
        assert sink.submit_copies(Copies.of([(dns("hit.test", ["192.0.2.9"]), None, T0, "u", 1, 1, 1)]))
        assert sink.join.table == {}  # not yet
        assert sink.submit(conn("192.0.2.9"))
        assert [r.dns_name for r in sink.writer.records if isinstance(r, Conn)] == ["hit.test"]

    asyncio.run(go())
