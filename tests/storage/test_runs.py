"""Runs (storage/runs.py): the copies of a prototype kept as one row are read, queried
and verified exactly as the rows they stand for, and any change to them is found."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import schema
from storage import writer as writer_mod
from storage import chain
from storage import runs as runs_mod
from storage.partitions import day_path
from storage.query import query, to_json
from storage.records import Record
from storage.schema import Copies
from storage.verify import verify_store
from storage.writer import RecordWriter
from tests.storage.conftest import DAYS, NOW, day_start
from tests.storage.test_copies import ALARM, BLOCK, HIT, ODD, encoder, values
from tests.storage.test_copies import write as write_items

T0 = day_start(DAYS[0]) + 3600 * 1_000_000
OTHER = msgspec.structs.replace(HIT, account="bob", client_ip="10.0.0.9", qname="cdn.other.test",
                                answers=["198.51.100.4"])
PAIRS = [(HIT, None), (OTHER, None), (BLOCK, ALARM), (ODD, None)]
"""Three prototypes that make runs (one with a companion alarm) and one that cannot (a
community id of its own: written as rows)."""
FILTERS: list[dict[str, Any]] = [
    {}, {"account": "alice"}, {"account": "nobody"}, {"domain": "example.test"}, {"domain": "test"},
    {"kind": "alarm"}, {"kind": "dns"}, {"ip": "10.0.0.8"}, {"ip": "10.0.0.0/24"}, {"action": "block"},
    {"since": T0 + 40, "until": T0 + 160}, {"since": T0 + 100, "account": "bob"}, {"until": T0 + 50, "kind": "alarm"},
]


def write(store: Path, items: list[Record | Copies], runs: bool, **cfg: Any) -> RecordWriter:
    """test_copies.write, with copies in runs or in rows."""
    old = writer_mod._Encoding.RUNS
    writer_mod._Encoding.RUNS = runs
    try:
        return write_items(store, items, **cfg)
    finally:
        writer_mod._Encoding.RUNS = old


def sql(store: Path, *stmts: str, day: str = DAYS[0]) -> list[Any]:
    with sqlite3.connect(day_path(store, day)) as c:
        out = [c.execute(s).fetchall() for s in stmts]
    return out


def as_json(records: Any) -> list[bytes]:
    """Without the writer's own maintenance records (they name the store's path)."""
    return [to_json(r) for r in records if r.__struct_config__.tag != "maintenance"]


copies_st = st.lists(
    st.lists(st.tuples(st.integers(0, len(PAIRS) - 1), st.integers(0, 200), st.integers(0, 65535),
                       st.integers(0, 65535), st.integers(0, 10**6)), min_size=1, max_size=8),
    min_size=1, max_size=8)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(copies_st, st.integers(3, 40))
def test_runs_read_back_as_the_rows_they_stand_for(tmp_path_factory: pytest.TempPathFactory,
                                                  batches: list[list[tuple[int, ...]]], batch_max: int) -> None:
    items: list[Record | Copies] = []
    n = 0
    for b in batches:
        entries = []
        for p, dt, port, dns_id, lat in b:
            entries.append((*PAIRS[p], T0 + dt, f"U.{n:x}", port, dns_id, lat))
            n += 1
        items.append(Copies.of(entries))
        items.append(msgspec.structs.replace(HIT, ts=T0 + n, uid=f"R.{n}"))  # a plain record between
    base = tmp_path_factory.mktemp("runs")
    a, b = base / "runs", base / "rows"
    write(a, items, True, batch_max=batch_max)
    write(b, items, False, batch_max=batch_max)
    for f in FILTERS:
        got, want = list(query(a, **f)), list(query(b, **f))
        assert sorted(as_json(got)) == sorted(as_json(want)), f
        assert [r.ts for r in got] == sorted(r.ts for r in got), f  # merged in time order
    full = list(query(a))
    for limit in (1, 5, len(full)):
        assert as_json(query(a, limit=limit)) == as_json(full[:limit])
    assert sql(b, "SELECT count(*) FROM runs")[0][0][0] == 0
    if any(p != 3 for b_ in batches for p, *_ in b_):
        assert sql(a, "SELECT count(*) FROM runs")[0][0][0] > 0
    ra, rb = verify_store(a, now=NOW), verify_store(b, now=NOW)
    assert ra.ok and rb.ok, (ra.problems, rb.problems)
    assert ra.rows == rb.rows == len(full)


def many(n: int = 60) -> list[Record | Copies]:
    return [Copies.of([(*PAIRS[k % 3], T0 + k, f"U.{k}", 1000 + k, k, 7) for k in range(n)])]


def problems(store: Path) -> str:
    rep = verify_store(store, now=NOW)
    return " | ".join(p.message for p in rep.problems)


def test_changed_run_is_found(tmp_path: Path) -> None:
    store = tmp_path / "s"
    write(store, many(), True)
    assert problems(store) == ""
    (first, data), = sql(store, "SELECT first_id, data FROM run_data ORDER BY first_id LIMIT 1")[0]
    changed = msgspec.msgpack.decode(data)
    changed[0][4] += 1  # one copy's latency
    with sqlite3.connect(day_path(store, DAYS[0])) as c:
        c.execute("UPDATE run_data SET data = ? WHERE first_id = ?", (msgspec.msgpack.encode(changed), first))
    assert "hash mismatch" in problems(store)


@pytest.mark.parametrize(("change", "found"), [
    ("UPDATE protos SET server_port = 54 WHERE id = (SELECT min(id) FROM protos)", "hash mismatch"),
    ("DELETE FROM protos", "cannot be decoded"),
    ("UPDATE run_data SET data = x'c1' WHERE first_id = (SELECT max(first_id) FROM runs)", "cannot be decoded"),
    ("DELETE FROM run_data WHERE first_id = (SELECT min(first_id) FROM runs)", "cannot be decoded"),
    ("DELETE FROM runs WHERE first_id = (SELECT max(first_id) FROM runs)", "deleted"),
])
def test_a_changed_prototype_or_a_removed_run_is_found(tmp_path: Path, change: str, found: str) -> None:
    store = tmp_path / "s"
    write(store, many(), True)
    sql(store, change)
    assert found in problems(store)


def test_writer_reopening_a_day_continues_after_its_runs(tmp_path: Path) -> None:
    store = tmp_path / "s"
    write(store, many(), True)
    more = [Copies.of([(*PAIRS[k % 3], T0 + 500 + k, f"V.{k}", k, k, k) for k in range(20)]),
            msgspec.structs.replace(HIT, ts=T0 + 900, uid="plain")]
    write(store, more, True)
    assert problems(store) == ""
    recs = list(query(store, kind=("dns", "alarm")))
    assert len(recs) == 60 + 60 // 3 + 20 + 20 // 3 + 1  # every third has its alarm
    assert len({r.uid for r in recs if r.__struct_config__.tag == "dns"}) == 81  # type: ignore[attr-defined]


def test_a_file_without_runs_reads_and_takes_runs_later(tmp_path: Path) -> None:
    store = tmp_path / "s"
    write(store, many(30), False)
    sql(store, "DROP TABLE runs", "DROP TABLE run_data", "DROP TABLE protos")  # as a format 1 file is
    assert problems(store) == ""
    before = as_json(query(store))
    assert len(before) == 40
    write(store, [Copies.of([(HIT, None, T0 + 1000 + k, f"W.{k}", k, k, k) for k in range(5)])], True)
    assert problems(store) == ""
    after = as_json(query(store))
    assert after[:40] == before and len(after) == 45
    assert sql(store, "SELECT count(*) FROM runs")[0][0][0] == 1


@pytest.mark.parametrize("compiled", [True, False], ids=["c", "python"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PAIRS[:3]), st.lists(values, min_size=1, max_size=10))
def test_a_run_holds_exactly_its_copies(compiled: bool, monkeypatch: pytest.MonkeyPatch,
                                        pair: tuple[Any, Any], vals: list[Any]) -> None:
    """``encode_run`` (C or Python) gives the copies' row bytes and a ``data`` that
    ``Runs`` reads back to the same values, over every msgpack int and str form."""
    if compiled and schema._copies is None:
        pytest.skip("storage._copies not built")
    monkeypatch.setattr(schema, "_copies", schema._copies if compiled else None)
    entries = [(*pair, *v) for v in vals]
    enc, rows_enc = encoder(), encoder()
    pid, cpid, data, framed = enc.encode_run(entries, 10)
    want: list[bytes] = []
    list(rows_enc.encode_copies(Copies.of(entries), 10, want))
    assert framed == b"".join(len(lg).to_bytes(4, "big") + lg for lg in want)
    assert data == msgspec.msgpack.encode([e[2:] for e in entries])
    assert runs_mod.unpack(data) == [list(e[2:]) for e in entries]
    assert (pid, cpid) == (1, None if pair[1] is None else 2)
    assert len(enc.take_protos()) == (1 if pair[1] is None else 2)
    assert enc.encode_run(entries, 10)[:2] == (pid, cpid) and enc.take_protos() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_compiled_framing_equals_python(rows: list[bytes]) -> None:
    """The chain hashes each row after its 4-byte length; ``_copies.frame`` (C) writes the
    same bytes as the Python join, and a list that is not all bytes takes the join."""
    if chain._copies is None:
        pytest.skip("storage._copies not built")
    want = b"".join(len(r).to_bytes(4, "big") + r for r in rows)
    assert chain._copies.frame(rows) == want == chain.frame(rows)
    assert chain.frame([bytearray(r) for r in rows]) == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, len(PAIRS) - 1), st.integers(0, 9)), max_size=10), max_size=5),
       st.booleans())
def test_compiled_grouping_equals_python(lists: list[list[tuple[int, int]]], mixed: bool) -> None:
    """``by_prototype`` in C and in Python: the same groups in the same order; copies of
    one prototype with another companion (never made by the hit path) are grouped apart."""
    pairs = [*PAIRS, (HIT, ALARM)] if mixed else PAIRS
    copies = [Copies.of([(*pairs[p if not mixed or p else len(pairs) - 1 if k % 2 else 0], T0 + k, "u", 1, 2, 3)
                         for k, (p, _) in enumerate(es)]) for es in lists]
    fast = schema.by_prototype(copies)
    saved = schema._copies
    schema._copies = None
    try:
        slow = schema.by_prototype(copies)
    finally:
        schema._copies = saved
    assert fast == slow
    assert sorted(id(e) for g in slow for e in g) == sorted(id(e) for c in copies for e in c.entries)
    assert all(g[0][0] is e[0] and g[0][1] is e[1] for g in slow for e in g)


def test_copies_go_in_as_rows_when_runs_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while making runs costs the batch its compaction, never its records."""
    def broken(copies: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(writer_mod, "by_prototype", broken)
    store = tmp_path / "s"
    write(store, many(30), True)
    assert sql(store, "SELECT count(*) FROM runs")[0][0][0] == 0
    assert len(list(query(store, kind=("dns", "alarm")))) == 40 and problems(store) == ""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, len(PAIRS) - 1), max_size=10), max_size=4))
def test_compiled_latest_copies_equals_python(batches: list[list[int]]) -> None:
    """``latest_copies`` in C and in Python leave the same dict, in the same order."""
    fast: dict[int, Any] = {}
    slow: dict[int, Any] = {}
    saved = schema._copies
    for n, b in enumerate(batches):
        entries = [(*PAIRS[p], T0 + k, f"u{n}.{k}", 1, 2, 3) for k, p in enumerate(b)]
        schema.latest_copies(entries, fast)
        schema._copies = None
        try:
            schema.latest_copies(entries, slow)
        finally:
            schema._copies = saved
    assert list(fast.items()) == list(slow.items())
