"""proxy/dns_hits.py + proxy/_dnshits.c: the compiled hit path of the DNS shim.

The shim runs as in a worker process: its records go through a real channel
(``ChannelSink`` on a socketpair → ``ChannelReader`` → ``RecordWriter``), so the hit
path is on. Every test compares with what the Python path answers and records."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from dnslib import RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from linewarden.workers import ChannelReader, ChannelSink, WorkerHandle, _SinkProtocol
from proxy import dns_hits
from proxy.dns_shim import DnsShim, EngineRef
from proxy.identity import Identity
from rules.engine import Engine
from storage.config import StoreConfig
from storage.records import Alarm, Dns
from storage.writer import RecordWriter
from tests.proxy.test_dns_shim import Zone, cfg, dns_records, exchange, make_query, read_store, write_rules

pytestmark = pytest.mark.skipif(not dns_hits.ENABLED, reason="proxy._dnshits not built")

PER_QUERY = ("ts", "uid", "client_port", "dns_id", "latency_us")


class ChannelRig:
    """A shim whose sink is a worker's channel to a main-process writer."""

    def __init__(self, shim: DnsShim, writer: RecordWriter, sink: ChannelSink, store: Path) -> None:
        self.shim, self.writer, self.sink, self.store = shim, writer, sink, store

    async def ask(self, data: bytes) -> bytes:
        assert self.shim.udp_address is not None
        return await exchange(self.shim.udp_address, data)

    async def records(self) -> list[Any]:
        self.sink.flush()
        for _ in range(200):  # the channel is a socket: let the reader catch up
            await asyncio.sleep(0.01)
            if self.sink.transport.get_write_buffer_size() == 0:
                break
        await asyncio.sleep(0.05)
        await self.writer.flush()
        return read_store(self.store)


@pytest.fixture
async def zone() -> AsyncIterator[Zone]:
    z = Zone()
    await z.start()
    yield z
    await z.stop()


@pytest.fixture
async def rig(tmp_path: Path, zone: Zone) -> AsyncIterator[ChannelRig]:
    store = tmp_path / "store"
    writer = RecordWriter(store, StoreConfig(commit_interval_ms=20))
    await writer.start()
    loop = asyncio.get_running_loop()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handle = WorkerHandle(index=0)
    handle.ready.set_result(True)  # as after the worker's hello
    _, handle.reader = await loop.connect_accepted_socket(lambda: ChannelReader(writer, handle), parent)
    transport, _ = await loop.connect_accepted_socket(_SinkProtocol, child)
    sink = ChannelSink(transport, fail_open=True)  # type: ignore[arg-type]
    ident = Identity.from_config([{"ip": "127.0.0.1", "account": "alice", "mac": "02:00:00:00:00:01"}])
    engine = Engine.from_dir(write_rules(tmp_path / "rules"))
    shim = DnsShim(cfg(), EngineRef(engine), sink, ident, upstreams=[zone.address])
    await shim.start()
    assert shim.fast is not None
    yield ChannelRig(shim, writer, sink, store)
    await shim.stop()
    sink.flush()
    transport.close()
    await asyncio.sleep(0.05)
    await writer.close()


def fields(rec: Any, skip: tuple[str, ...] = PER_QUERY) -> dict[str, Any]:
    return {k: v for k, v in msgspec.structs.asdict(rec).items() if k not in skip}


async def test_repeated_question_is_answered_in_c_and_recorded_like_the_python_path(
        rig: ChannelRig, zone: Zone) -> None:
    first = await rig.ask(make_query("www.lw.test", qid=1))   # upstream: a miss
    second = await rig.ask(make_query("www.lw.test", qid=2))  # cache hit: the Python path, learnt
    answers = [await rig.ask(make_query("www.lw.test", qid=q)) for q in range(3, 13)]
    assert rig.shim.stats["fast_hits"] >= 9  # the same second: all but a refresh in C
    assert zone.udp_queries == 1
    for q, a in zip(range(3, 13), answers):
        assert a[:2] == q.to_bytes(2, "big") and a[2:] == second[2:]
    assert DNSRecord.parse(first).rr[0].rdata == DNSRecord.parse(answers[-1]).rr[0].rdata
    recs = dns_records(await rig.records())
    assert len(recs) == 12
    proto = fields(recs[1])
    for q, rec in zip(range(3, 13), recs[2:]):
        assert fields(rec) == proto  # every other field exactly the Python path's
        assert rec.dns_id == q and rec.client_port and rec.latency_us is not None and rec.ts >= recs[1].ts
    assert len({r.uid for r in recs}) == 12 and all(r.uid.startswith(rig.shim._uid_prefix) for r in recs)


async def test_blocked_question_is_answered_in_c_with_its_alarm(rig: ChannelRig, zone: Zone) -> None:
    out = [await rig.ask(make_query("www.casino.lw.test", qid=q)) for q in range(1, 9)]
    assert all(DNSRecord.parse(a).header.rcode == RCODE.NXDOMAIN for a in out)
    assert all(a[2:] == out[0][2:] and a[:2] == q.to_bytes(2, "big") for q, a in zip(range(1, 9), out))
    assert rig.shim.stats["fast_hits"] >= 5 and zone.udp_queries == 0
    recs = await rig.records()
    dns = dns_records(recs)
    alarms = [r for r in recs if isinstance(r, Alarm)]
    assert len(dns) == 8 and len(alarms) == 8
    assert {r.uid for r in dns} == {a.uid for a in alarms}
    assert all(fields(r) == fields(dns[1]) for r in dns[1:])
    assert all(fields(a, ("ts", "uid", "client_port")) == fields(alarms[0], ("ts", "uid", "client_port"))
               for a in alarms)
    assert alarms[-1].detail.startswith("dns query www.casino.lw.test A blocked")


async def test_answer_ages_after_a_second_of_cache_age(rig: ChannelRig) -> None:
    await rig.ask(make_query("www.lw.test", qid=1))
    a = await rig.ask(make_query("www.lw.test", qid=2))
    await asyncio.sleep(1.1)
    hits = rig.shim.stats["fast_hits"]
    b = await rig.ask(make_query("www.lw.test", qid=3))
    ttl_a = DNSRecord.parse(a).rr[0].ttl
    ttl_b = DNSRecord.parse(b).rr[0].ttl
    assert ttl_b == ttl_a - 1  # not the memorised answer of the previous second
    assert rig.shim.stats["fast_hits"] == hits + 1  # aged in C, not asked of Python again


async def test_reload_empties_the_table(rig: ChannelRig, tmp_path: Path) -> None:
    for q in range(1, 5):
        assert DNSRecord.parse(await rig.ask(make_query("www.lw.test", qid=q))).header.rcode == 0
    rules = write_rules(tmp_path / "rules2")
    (rules / "domains.tsv").write_text((rules / "domains.tsv").read_text() + "g9\tgambling\twww.lw.test\n")
    rig.shim.engine.swap(Engine.from_dir(rules))
    assert DNSRecord.parse(await rig.ask(make_query("www.lw.test", qid=9))).header.rcode == RCODE.NXDOMAIN


async def test_case_edns_and_client_port_each_keep_their_own_answer(rig: ChannelRig) -> None:
    shapes = [make_query("www.lw.test"), make_query("WWW.lw.test"), make_query("www.lw.test", edns=1232)]
    first = [await rig.ask(s) for s in shapes]
    for _ in range(3):
        for s, f in zip(shapes, first):
            assert await rig.ask(s) == f  # same id (4242): byte for byte the first answer
    assert rig.shim.stats["fast_hits"] >= 3
    assert DNSRecord.parse(first[1]).q.qname == "WWW.lw.test."
    assert DNSRecord.parse(first[2]).ar  # the EDNS client gets its OPT back


async def test_malformed_datagrams_still_take_the_python_path(rig: ChannelRig) -> None:
    await rig.ask(make_query("www.lw.test"))
    await rig.ask(make_query("www.lw.test"))
    bad = make_query("www.lw.test")[:-3]  # truncated question
    out = await rig.ask(bad)
    assert DNSRecord.parse(out).header.rcode == RCODE.FORMERR
    assert rig.shim.stats["malformed"] == 1


async def test_a_backlogged_channel_holds_the_listener_instead_of_dropping(rig: ChannelRig) -> None:
    await rig.ask(make_query("www.lw.test"))
    real = rig.sink.accepting
    rig.sink.accepting = lambda: False  # type: ignore[method-assign]
    task = asyncio.create_task(rig.ask(make_query("www.lw.test", qid=77)))
    await asyncio.sleep(0.05)
    assert not task.done() and rig.shim.stats["udp_held"] >= 1
    rig.sink.accepting = real  # type: ignore[method-assign]
    out = await task
    assert out[:2] == (77).to_bytes(2, "big")
    assert len(dns_records(await rig.records())) == 2


def test_expand_rebuilds_each_record_from_its_template() -> None:
    proto = Dns(ts=0, uid="x", client_ip="10.0.0.7", qname="a.example", qtype=1, answers=["192.0.2.1"],
                cache_hit=True, latency_us=0)
    alarm = Alarm(ts=0, uid="x", client_ip="10.0.0.7", action="block", detail="d")
    raw = (dns_hits.HIT_RECORD.pack(1_700_000_000_000_000, 0x1f, 0, 5353, 7, 12)
           + dns_hits.HIT_RECORD.pack(1_700_000_000_000_001, 0x20, 1, 5354, 8, 0))
    out = dns_hits.copies(raw, {0: ("Dp.", proto, None), 1: ("Dp.", proto, alarm)}).records()
    assert [type(r) for r in out] == [Dns, Dns, Alarm]
    assert (out[0].ts, out[0].uid, out[0].client_port, out[0].dns_id, out[0].latency_us) == (
        1_700_000_000_000_000, "Dp.1f", 5353, 7, 12)
    assert out[2].uid == out[1].uid == "Dp.20" and out[2].client_port == 5354
    assert fields(out[0]) == fields(proto)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**62), st.integers(0, 2**64 - 1), st.integers(0, 3),
                          st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**32 - 1)),
                max_size=20))
def test_hit_records_round_trip(rows: list[tuple[int, int, int, int, int, int]]) -> None:
    proto = Dns(ts=0, qname="n")
    tmpl = {i: (f"P{i}.", proto, None) for i in range(4)}
    raw = b"".join(dns_hits.HIT_RECORD.pack(*r) for r in rows)
    out = dns_hits.copies(raw, tmpl).records()
    assert [(r.ts, r.uid, r.client_port, r.dns_id, r.latency_us) for r in out] == [
        (ts, f"P{t}.{seq:x}", port, did, lat) for ts, seq, t, port, did, lat in rows]


@contextlib.contextmanager
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the shim's non-blocking socket, a client's), on loopback."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setblocking(False)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.bind(("127.0.0.1", 0))
    try:
        yield srv, cli
    finally:
        srv.close()
        cli.close()


def test_serve_leaves_everything_unknown_to_python() -> None:
    """The C loop directly: a datagram not in the table comes back whole, with its address."""
    with udp_pair() as (srv, cli):
        q = make_query("x.lw.test", qid=5)
        cli.sendto(q, srv.getsockname())
        cli.sendto(b"\x00", srv.getsockname())
        table: dict[bytes, tuple[bytes, int, float]] = {}
        recs = bytearray()
        import time
        time.sleep(0.05)
        misses, seq, hits, unsent, more = dns_hits._dnshits.serve(srv.fileno(), table, recs, 10, 64)
        assert [m[0] for m in misses] == [q, b"\x00"] and misses[0][1] == cli.getsockname()
        assert (seq, hits, unsent, more, bytes(recs)) == (10, 0, 0, False, b"")
        # Now known, until a time already past: still Python's; then valid: answered here.
        key = dns_hits.client_key("127.0.0.1") + q[2:]  # type: ignore[operator]
        table[key] = (b"BODY", 3, 0.0)
        cli.sendto(q, srv.getsockname())
        time.sleep(0.05)
        assert len(dns_hits._dnshits.serve(srv.fileno(), table, recs, 10, 64)[0]) == 1
        table[key] = (b"BODY", 3, time.monotonic() + 60)
        cli.sendto(q, srv.getsockname())
        time.sleep(0.05)
        misses, seq, hits, unsent, more = dns_hits._dnshits.serve(srv.fileno(), table, recs, 10, 64)
        assert (misses, seq, hits, unsent) == ([], 11, 1, 0)
        assert cli.recv(100) == q[:2] + b"BODY"
        ts, s, tid, port, did, lat = struct.unpack("<qQIHHI", bytes(recs))
        assert (s, tid, port, did) == (10, 3, cli.getsockname()[1], 5) and abs(ts / 1e6 - time.time()) < 5


async def test_a_stuck_store_stops_the_holding_and_the_python_path_answers(
        rig: ChannelRig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holding is for a busy writer; a stuck one gets the overflow policy (fail-open: answer)."""
    import proxy.dns_shim as shim_mod

    monkeypatch.setattr(shim_mod, "HOLD_MAX_S", 0.2)
    await rig.ask(make_query("www.lw.test"))
    rig.sink.accepting = lambda: False  # type: ignore[method-assign]
    t0 = asyncio.get_running_loop().time()
    out = await rig.ask(make_query("www.lw.test", qid=78))
    waited = asyncio.get_running_loop().time() - t0
    assert out[:2] == (78).to_bytes(2, "big") and 0.15 < waited < 2.0
    assert rig.shim.stats["udp_held"] >= 1 and rig.shim.stats["fast_hits"] == 0


async def test_the_channel_reader_pauses_for_a_busy_writer_not_for_a_stuck_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import linewarden.workers as workers_mod

    monkeypatch.setattr(workers_mod, "BACKLOG_PAUSE_MAX_S", 0.2)

    class Writer:
        backlogged = True

        def __init__(self) -> None:
            self.got: list[Any] = []

        def submit(self, r: Any) -> bool:
            self.got.append(r)
            return True

    loop = asyncio.get_running_loop()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    w = Writer()
    handle = WorkerHandle(index=0)
    handle.ready.set_result(True)  # as after the worker's hello
    _, reader = await loop.connect_accepted_socket(lambda: ChannelReader(w, handle), parent)
    transport, _ = await loop.connect_accepted_socket(_SinkProtocol, child)
    sink = ChannelSink(transport, fail_open=True)  # type: ignore[arg-type]
    try:
        sink.submit(Dns(ts=1, qname="a"))
        sink.flush()
        await asyncio.sleep(0.05)
        assert len(w.got) == 1 and reader.paused  # a backlog: the next frame waits
        sink.submit(Dns(ts=2, qname="b"))
        sink.flush()
        await asyncio.sleep(0.05)
        assert len(w.got) == 1
        await asyncio.sleep(0.3)  # still backlogged past the limit: reading goes on
        assert len(w.got) == 2 and not reader.paused and reader.overridden
        sink.submit(Dns(ts=3, qname="c"))
        sink.flush()
        await asyncio.sleep(0.05)
        assert len(w.got) == 3 and not reader.paused  # no new pause until the backlog clears
        w.backlogged = False
        sink.submit(Dns(ts=4, qname="d"))
        sink.flush()
        await asyncio.sleep(0.05)
        assert len(w.got) == 4 and not reader.overridden
    finally:
        transport.close()
        await asyncio.sleep(0.01)


async def test_template_numbers_wrap_without_renaming_earlier_hits(
        rig: ChannelRig, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 template numbers, names asked in turn reuse them all the time: every record
    still names the question its query asked."""
    monkeypatch.setattr(dns_hits, "TEMPLATE_MAX", 2)
    names = ["www.lw.test", "WWW.lw.test", "wWw.lw.test", "www.casino.lw.test"]
    qid = 0
    for _ in range(3):
        for n in names:
            for _ in range(3):
                qid += 1
                await rig.ask(make_query(n, qid=qid))
    assert rig.shim.stats["fast_hits"] >= 10
    recs = dns_records(await rig.records())
    assert [r.dns_id for r in recs] == list(range(1, qid + 1))
    asked = [n for _ in range(3) for n in names for _ in range(3)]
    assert [r.qname for r in recs] == asked


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4), st.floats(0, 5000), st.booleans())
def test_the_c_loop_ages_ttls_as_the_cache_renders_them(ttls: list[int], age: float, edns: bool) -> None:
    """An answer served from the table long after it was learnt carries the TTLs that
    ``CachedWire.render`` gives at that age, byte for byte (EDNS clients included)."""
    import time

    from dnslib import QTYPE, RR, A

    from proxy import dns_fastpath as fp

    query = make_query("x.lw.test", qid=7, edns=1232 if edns else None)
    reply = DNSRecord.parse(query).reply()
    for i, ttl in enumerate(ttls):
        reply.add_answer(RR("x.lw.test", QTYPE.A, rdata=A(f"192.0.2.{i + 1}"), ttl=ttl))
    now = time.monotonic()
    wire = fp.CachedWire(fp.walk_response(bytes(reply.pack())), now - age)
    q = fp.parse_query(query)
    learnt = wire.render(query, q, now - age)  # as answered when stored
    fast = dns_hits.FastHits(_NullSink(), "P")  # type: ignore[arg-type]
    fast.learn("127.0.0.1", query, learnt, Dns(ts=0), None, now + 60,
               (wire.stored, wire.ttl_offsets, wire.ttls))
    with udp_pair() as (srv, cli):
        cli.sendto(query, srv.getsockname())
        time.sleep(0.01)
        misses, _seq, hits, _unsent, _more = dns_hits._dnshits.serve(srv.fileno(), fast.table, bytearray(), 1, 64)
        served_at = time.monotonic()
        assert (misses, hits) == ([], 1)
        got = cli.recv(4096)
        want = {wire.render(query, q, t) for t in (now, served_at)}  # a second may turn between
        assert got in want


class _NullSink:
    def template(self, tid: int, tmpl: Any) -> None:
        pass

    def hits(self, records: bytes) -> None:
        pass

    def accepting(self) -> bool:
        return True


def test_workers_templates_for_one_answer_share_one_prototype() -> None:
    """Two workers' prototypes that differ only in what each copy replaces become one
    object in the main process (one run, one learn); any other difference keeps two."""
    from linewarden.workers import shared_prototypes

    a = Dns(ts=1, uid="Pa.1", client_ip="10.0.0.7", client_port=5, qname="x.test", dns_id=1, latency_us=9)
    b = msgspec.structs.replace(a, ts=2, uid="Pb.7", client_port=6, dns_id=2, latency_us=3)
    alarm_a = Alarm(ts=1, uid="Pa.1", client_port=5, alarm_kind="illegal_content")
    alarm_b = msgspec.structs.replace(alarm_a, ts=2, uid="Pb.7", client_port=6)
    assert shared_prototypes(a, None)[0] is shared_prototypes(b, None)[0]
    first = shared_prototypes(a, alarm_a)
    assert shared_prototypes(b, alarm_b) is first and first != shared_prototypes(a, None)
    other = msgspec.structs.replace(b, qname="y.test")
    assert shared_prototypes(other, None)[0] is other
