"""storage.schema.Copies through the real writer: the DNS hit path's records are stored
as exactly the rows and chain bytes their expanded records would have given."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import schema
from storage.config import StoreConfig
from storage.query import query
from storage.records import Alarm, Dns, Record
from storage.schema import Copies, Interner, RowEncoder, current_layouts, make_layout
from storage.verify import verify_store
from storage.writer import RecordWriter
from tests.storage.conftest import DAYS, NOW, clock, day_start

HIT = Dns(ts=0, uid="", account="alice", client_ip="10.0.0.7", client_mac="02:00:00:00:00:01",
          action="allow", ruleset_version=3, qname="www.Example.test", qtype=1, qtype_name="A",
          rcode=0, rcode_name="NOERROR", answers=["192.0.2.1", "192.0.2.2"], transport="udp",
          cache_hit=True, latency_us=0, dns_id=0)
BLOCK = Dns(ts=0, uid="", client_ip="10.0.0.8", action="block", rule_ids=["g1"], ruleset_version=3,
            qname="casino.test", qtype=28, qtype_name="AAAA", rcode=3, rcode_name="NXDOMAIN",
            transport="udp", latency_us=0, dns_id=0)
ALARM = Alarm(ts=0, uid="", client_ip="10.0.0.8", action="block", rule_ids=["g1"], ruleset_version=3,
              alarm_kind="illegal_content", detail="dns query casino.test AAAA blocked")
ODD = msgspec.structs.replace(HIT, community_id="1:abc=")  # a community id: the general encoder


def encoder() -> RowEncoder:
    layouts = {tag: make_layout(i + 1, tag, f) for i, (tag, f) in enumerate(current_layouts().items())}
    return RowEncoder(layouts, Interner())


an_int = st.one_of(st.integers(0, 2**16), st.integers(-(2**63), 2**64 - 1))
"""Every msgpack integer form."""
int_or_bool = st.one_of(an_int, st.booleans())
"""In ``x`` a bool is kept as msgpack writes it (not an int): the C path leaves it to Python."""
values = st.tuples(an_int, st.one_of(st.text(max_size=12), st.text(min_size=30, max_size=300)),
                   an_int, int_or_bool, int_or_bool)


@pytest.mark.parametrize("compiled", [True, False], ids=["c", "python"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([(HIT, None), (BLOCK, ALARM), (ODD, None)]), values),
                max_size=12))
def test_copies_encode_exactly_as_their_records(compiled: bool, monkeypatch: pytest.MonkeyPatch,
                                                entries: list[Any]) -> None:
    if compiled and schema._copies is None:
        pytest.skip("storage._copies not built")
    monkeypatch.setattr(schema, "_copies", schema._copies if compiled else None)
    copies = Copies.of([(p, c, *v) for (p, c), v in entries])
    fast_enc, slow_enc = encoder(), encoder()
    logical: list[bytes] = []
    rows = list(fast_enc.encode_copies(copies, 100, logical))
    recs = copies.records()
    assert len(rows) == len(recs) == copies.count
    expect = [slow_enc.encode(r, 100 + i) for i, r in enumerate(recs)]
    assert rows == [row for row, _ in expect]
    assert logical == [lg for _, lg in expect]
    assert fast_enc.interner.ids == slow_enc.interner.ids


def write(store: Path, items: list[Record | Copies], **cfg: Any) -> RecordWriter:
    async def go() -> RecordWriter:
        w = RecordWriter(store, StoreConfig(**cfg), clock=clock)
        await w.start()
        for it in items:
            assert w.submit_copies(it) if isinstance(it, Copies) else w.submit(it)
        await w.close()
        return w

    return asyncio.run(go())


def test_written_copies_read_back_as_their_records_and_verify(tmp_path: Path) -> None:
    t0 = day_start(DAYS[0]) + 3600 * 1_000_000
    items: list[Record | Copies] = []
    expected: list[Record] = []
    for k in range(30):
        rec = msgspec.structs.replace(HIT, ts=t0 + k * 10, uid=f"P.{k}", client_port=1000 + k)
        c = Copies.of([(HIT, None, t0 + k * 10 + 1, f"C.{k}a", 2000 + k, k, 5),
                       (BLOCK, ALARM, t0 + k * 10 + 2, f"C.{k}b", 3000 + k, 65535, 9)])
        items += [rec, c]
        expected += [rec, *c.records()]
    store = tmp_path / "store"
    w = write(store, items, batch_max=25)  # batches end inside Copies and between them
    assert w.committed == len(expected) == 30 * 4
    got = [r for r in query(store) if isinstance(r, (Dns, Alarm))]
    assert got == expected
    rep = verify_store(store, now=NOW)
    assert rep.ok, rep.problems


def test_copies_straddling_midnight_go_to_both_days(tmp_path: Path) -> None:
    end = day_start(DAYS[1])
    c = Copies.of([(HIT, None, end - 1, "a", 1, 1, 1), (HIT, None, end, "b", 2, 2, 2)])
    store = tmp_path / "store"
    write(store, [c])
    by_day = {r.uid: r.ts for r in query(store) if isinstance(r, Dns)}
    assert by_day == {"a": end - 1, "b": end}
    assert verify_store(store, now=NOW).ok


def test_copies_count_in_the_queue_and_overflow_as_a_whole(tmp_path: Path) -> None:
    async def go() -> None:
        w = RecordWriter(tmp_path / "store", StoreConfig(queue_max=5), clock=clock)
        big = Copies.of([(BLOCK, ALARM, day_start(DAYS[0]) + i, f"u{i}", i, i, i) for i in range(3)])
        assert big.count == 6
        assert w.submit_copies(big)  # fail-open: dropped, counted
        assert (w.queued, w.dropped) == (0, 6)
        small = Copies.of([(HIT, None, day_start(DAYS[0]) + i, f"v{i}", i, i, i) for i in range(4)])
        assert w.submit_copies(small) and w.queued == 4 and w.backlogged
        assert w.submit(HIT) and w.queued == 5
        assert w.submit(HIT) and w.dropped == 7

    asyncio.run(go())
