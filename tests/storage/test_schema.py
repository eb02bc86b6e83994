"""storage/schema.py: lossless row encoding of every kind, and its size."""

from __future__ import annotations

import sqlite3

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.records import RECORD_TYPES, Conn, Dns, Http, Tls
from storage.schema import (
    COLUMNS,
    DDL,
    DOMAIN_FIELD,
    INTERNED,
    BadRecord,
    Interner,
    RowDecoder,
    RowEncoder,
    ROWS_PER_INSERT,
    chunk_plan,
    current_layouts,
    domain_key,
    insert_statements,
    ip_from_db,
    ip_to_db,
    make_layout,
)
from tests.storage.conftest import one_of_each


def roundtrip(records):
    conn = sqlite3.connect(":memory:")
    for s in DDL:
        conn.execute(s)
    layouts = {}
    for code, (tag, fields) in enumerate(current_layouts().items()):
        conn.execute("INSERT INTO kinds VALUES (?, ?, ?)", (code, tag, msgspec.json.encode(list(fields)).decode()))
        layouts[tag] = make_layout(code, tag, fields)
    it = Interner()
    enc = RowEncoder(layouts, it)
    rows, logical = [], []
    for i, r in enumerate(records, 1):
        row, lg = enc.encode(r, i)
        rows.append(row)
        logical.append(lg)
    new, rkeys = it.take()
    for sql, params in insert_statements("strs", ("id", "v", "rkey"), new):
        conn.execute(sql, params)
    conn.executemany("UPDATE strs SET rkey = ? WHERE id = ?", rkeys)
    for sql, params in insert_statements("rec", COLUMNS, rows):
        conn.execute(sql, params)
    dec = RowDecoder(conn)
    out = conn.execute("SELECT * FROM rec ORDER BY id").fetchall()
    assert [dec.logical(r) for r in out] == logical
    return [dec.record(r) for r in out], conn


@given(st.integers(0, 5 * ROWS_PER_INSERT))
def test_chunk_plan_covers_every_row_once_in_few_statements(n):
    plan = chunk_plan(n)
    covered = [i for size, lo, hi in plan for i in range(lo, hi)]
    assert covered == list(range(n))
    for size, lo, hi in plan:
        assert size & (size - 1) == 0 and size <= ROWS_PER_INSERT and (hi - lo) % size == 0
    statements = sum((hi - lo) // size for size, lo, hi in plan)
    assert statements <= n // ROWS_PER_INSERT + ROWS_PER_INSERT.bit_length()


def test_every_kind_round_trips_exactly():
    recs = one_of_each(1_767_000_000_000_000) + one_of_each(1_767_000_000_000_100, 7)
    got, _ = roundtrip(recs)
    assert got == recs
    assert [msgspec.json.encode(g) for g in got] == [msgspec.json.encode(r) for r in recs]


def test_every_kind_has_a_layout_and_domain_fields_exist():
    tags = {t.__struct_config__.tag for t in RECORD_TYPES}
    assert set(current_layouts()) == tags
    for tag, field in DOMAIN_FIELD.items():
        assert field in Conn.KINDS[tag].__struct_fields__
    all_fields = {f for t in RECORD_TYPES for f in t.__struct_fields__}
    assert INTERNED <= all_fields


@pytest.mark.parametrize("ip", ["10.0.0.1", "255.255.255.255", "0.0.0.0", "128.0.0.0", "2001:db8::1", "::ffff:1.2.3.4",
                                "010.0.0.1", "fe80::1%eth0", "not an ip", "2001:DB8::1", ""])
def test_addresses_are_kept_verbatim(ip):
    assert ip_from_db(ip_to_db(ip)) == ip


def test_canonical_ipv4_fits_four_bytes():
    for ip in ("0.0.0.0", "203.0.113.7", "255.255.255.255"):
        assert -(2**31) <= ip_to_db(ip) < 2**31


def test_community_id_matching_the_five_tuple_is_derived_and_others_kept():
    recs = one_of_each(1_767_000_000_000_000)
    _, conn = roundtrip(recs)
    stored = [r[0] for r in conn.execute("SELECT community_id FROM rec ORDER BY id")]
    assert stored[:3] == [1, 1, 1]  # dns, conn, tls: the hash of their own 5-tuple
    assert stored[3] == "1:not-the-hash"


def test_domain_key_reverses_labels():
    assert domain_key("www.Example.COM.") == "com.example.www"


@pytest.mark.parametrize("bad", [
    Conn(ts="yesterday"),  # type: ignore[arg-type]
    Conn(ts=1, client_ip=167772161),  # type: ignore[arg-type]
    Conn(ts=1, client_port="80"),  # type: ignore[arg-type]
    Conn(ts=1, community_id=1),  # type: ignore[arg-type]
    Conn(ts=1, action=2),  # type: ignore[arg-type]
    Conn(ts=1, ts_end="later"),  # type: ignore[arg-type]
])
def test_values_that_would_not_round_trip_are_refused(bad):
    it = Interner()
    layouts = {tag: make_layout(i, tag, f) for i, (tag, f) in enumerate(current_layouts().items())}
    with pytest.raises((BadRecord, TypeError)):
        RowEncoder(layouts, it).encode(bad, 1)


text = st.text(max_size=30)
opt_text = st.none() | text
ips = st.none() | st.ip_addresses().map(str) | text
ports = st.none() | st.integers(0, 65535)


@settings(max_examples=40, deadline=None)
@given(st.builds(Http, ts=st.integers(0, 2**53), uid=text, account=opt_text, client_ip=ips, client_port=ports,
                 client_mac=opt_text, nat_ip=ips, nat_port=ports, server_ip=ips, server_port=ports,
                 action=st.sampled_from(["allow", "block", "log"]), rule_ids=st.lists(text, max_size=3),
                 ruleset_version=st.none() | st.integers(0, 2**40), community_id=opt_text, method=opt_text,
                 host=opt_text, url=opt_text, status=st.none() | st.integers(100, 599), user_agent=opt_text,
                 req_bytes=st.integers(0, 2**40), content_type=opt_text, evidence=opt_text),
       st.builds(Dns, ts=st.integers(0, 2**53), qname=opt_text, answers=st.lists(text, max_size=3),
                 transport=st.sampled_from(["udp", "tcp"]), client_ip=ips, server_ip=ips, client_port=ports,
                 server_port=ports, community_id=opt_text),
       st.builds(Tls, ts=st.integers(0, 2**53), sni=opt_text, alpn=st.lists(text, max_size=3), intercepted=st.booleans()))
def test_round_trip_property(h, d, t):
    got, _ = roundtrip([h, d, t, h])
    assert got == [h, d, t, h]


def test_row_size_of_typical_records_is_small():
    # The bytes/record target (<= 150 with indexes) starts with compact rows.
    recs = [r for i in range(200) for r in one_of_each(1_767_000_000_000_000 + i * 1000, i)[:3]]
    _, conn = roundtrip(recs)
    avg = conn.execute("SELECT avg(length(x)) FROM rec").fetchone()[0]
    assert avg < 40
