"""Packed hit copies (storage/hits.py): the C that reads the DNS workers' hit records in
place (storage/_copies.c) gives exactly what their entries give, and the store holds the
same records whether copies come packed or as entries."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import hits, schema
from storage.partitions import day_path
from storage.query import query
from storage.records import Record
from storage.schema import Copies, by_prototype, group_hits, latest_copies
from storage.verify import verify_store
from tests.storage.conftest import DAYS, NOW
from tests.storage.test_copies import ALARM, BLOCK, HIT, ODD, encoder
from tests.storage.test_runs import OTHER, T0, as_json, write

_copies = schema._copies
needs_c = pytest.mark.skipif(_copies is None, reason="storage._copies not built")

TIDS = [0, 1, 5, 2**32 - 1]


def templates(prefix: str, odd: bool = False) -> dict[int, hits.Template]:
    """Two numbers for one prototype (as after a wrap), one with a companion."""
    return {0: (prefix, HIT, None), 1: (prefix + "b", HIT, None), 5: ("x", BLOCK, ALARM),
            2**32 - 1: (prefix, ODD if odd else OTHER, None)}


def hit_st(ts: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(ts, st.integers(0, 2**64 - 1), st.sampled_from(TIDS), st.integers(0, 65535),
                     st.integers(0, 65535), st.integers(0, 2**32 - 1))


any_ts = st.integers(-(2**63), 2**63 - 1)
near_ts = st.integers(T0, T0 + 4)
"""Few values: ties in ts, which a run keeps in arrival order."""
prefixes = st.sampled_from(["", "D1a2b.", "ü-", "p" * 100, "q" * 300])


def pack(hs: list[tuple[int, ...]]) -> bytes:
    return b"".join(hits.HIT.pack(*h) for h in hs)


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.lists(hit_st(st.one_of(any_ts, near_ts)), max_size=40), prefixes)
def test_compiled_scan_and_expand_equal_python(hs: list[tuple[int, ...]], prefix: str) -> None:
    """The same templates (the very objects), count, ts span and entries; an unknown
    template is a KeyError and a cut record a ValueError in both."""
    records, ts = pack(hs), templates(prefix)
    got, want = _copies.scan(records, ts), hits.scan(records, ts)
    assert got == want
    assert all(got[0][k] is want[0][k] for k in got[0])
    entries = hits.expand(records, want[0])
    assert _copies.expand(records, want[0]) == entries
    assert want[1] == len(entries) + sum(e[1] is not None for e in entries)
    assert Copies.of(entries) == Copies.of_hits(records, ts)
    if hs:
        for f in (_copies.scan, hits.scan, _copies.expand, hits.expand):
            with pytest.raises(KeyError):
                f(records, {})
            with pytest.raises(ValueError):
                f(records[:-1], ts)


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.lists(hit_st(near_ts), max_size=40), st.lists(st.sampled_from(TIDS), max_size=3))
def test_compiled_latest_equals_latest_of_the_entries(hs: list[tuple[int, ...]], before: list[int]) -> None:
    """``latest_hits`` (and ``hits.latest``) leave ``into`` as ``latest_copies`` of every
    entry does (keys, order, and the values' proto, companion and ts), with entries
    learnt before already there."""
    records, ts = pack(hs), templates("w.")
    tmap = hits.scan(records, ts)[0]
    into_c: dict[int, Any] = {}
    for tid in before:
        e = (ts[tid][1], ts[tid][2], 1, "old", 1, 1, 1)
        latest_copies([e], into_c)
    into_py = dict(into_c)
    into_h = dict(into_c)
    _copies.latest_hits(records, tmap, into_c)
    hits.latest(records, tmap, into_h)
    latest_copies(hits.expand(records, tmap), into_py)
    want = [(k, v[:3]) for k, v in into_py.items()]
    assert [(k, v[:3]) for k, v in into_c.items()] == [(k, v[:3]) for k, v in into_h.items()] == want
    assert all(v[0] is ts[0][1] or v[0] is ts[5][1] or v[0] is ts[2**32 - 1][1] for v in into_c.values())
    into_of: dict[int, Any] = {}
    schema.latest_of(Copies.of_hits(records, ts), into_of)
    assert [(k, v[:3]) for k, v in into_of.items()] == [(k, v[:3]) for k, v in latest_after(records, tmap)]


def latest_after(records: bytes, tmap: dict[int, hits.Template]) -> list[tuple[int, Any]]:
    into: dict[int, Any] = {}
    latest_copies(hits.expand(records, tmap), into)
    return list(into.items())


packs_st = st.lists(st.tuples(st.lists(hit_st(st.one_of(near_ts, any_ts)), min_size=1, max_size=12), prefixes),
                    min_size=1, max_size=4)


@needs_c
@settings(max_examples=200, deadline=None)
@given(packs_st)
def test_compiled_runs_of_packed_copies_equal_runs_of_their_entries(packs: list[tuple[list[Any], str]]) -> None:
    """``group_hits`` finds the groups ``by_prototype`` finds, in its order, prototypes
    shared across packs included; ``run_hits`` gives each the data, chain bytes, count
    and ts span that ``encode_run`` gives its entries in ts order."""
    copies = [Copies.of_hits(pack(hs), templates(prefix)) for hs, prefix in packs]
    got = group_hits(copies)
    assert got is not None
    packed, groups = got
    want = by_prototype([Copies.of(list(c.entries)) for c in copies])
    assert len(groups) == len(want)
    packed_enc, listed_enc = encoder(), encoder()
    for (proto, companion, at), entries in zip(groups, want):
        assert proto is entries[0][0] and companion is entries[0][1]
        assert hits.entries_at(packed, at) == entries
        entries.sort(key=lambda e: e[2])
        run = packed_enc.encode_hit_run(packed, at, proto, companion)
        assert run is not None
        assert run == (*listed_enc.encode_run(entries, 10), len(entries), entries[0][2], entries[-1][2])


def stored(store: Path) -> list[Any]:
    with sqlite3.connect(day_path(store, DAYS[0])) as c:
        return [c.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("rec", "protos", "runs", "run_data")]


@pytest.mark.parametrize("c_run", [True, False], ids=["c-runs", "entries-fallback"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(hit_st(near_ts), min_size=1, max_size=10), st.sampled_from(["a.", "b."])),
                min_size=1, max_size=6),
       st.integers(3, 40))
def test_packed_copies_store_exactly_as_listed_copies(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                                                     c_run: bool, batches: list[tuple[list[Any], str]],
                                                     batch_max: int) -> None:
    """Through the writer: the same rows, prototypes, runs and run data, the same query
    answers, and both verify; a prototype that cannot be a run (``ODD``) goes in as
    rows from packed copies too; where C gives no run, the entries make it."""
    if not c_run:
        monkeypatch.setattr(schema.RowEncoder, "encode_hit_run", lambda *a: None)
    packed: list[Record | Copies] = [Copies.of_hits(pack(hs), templates(p, odd=True)) for hs, p in batches]
    listed: list[Record | Copies] = [Copies.of(list(c.entries)) for c in packed]  # type: ignore[union-attr]
    packed = [Copies.of_hits(pack(hs), templates(p, odd=True)) for hs, p in batches]  # entries not yet made
    base = tmp_path_factory.mktemp("hits")
    a, b = base / "packed", base / "listed"
    write(a, packed, True, batch_max=batch_max)
    write(b, listed, True, batch_max=batch_max)
    assert stored(a) == stored(b)
    assert as_json(query(a)) == as_json(query(b))
    ra, rb = verify_store(a, now=NOW), verify_store(b, now=NOW)
    assert ra.ok and rb.ok, (ra.problems, rb.problems)
    assert ra.rows == rb.rows == len(list(query(a)))
