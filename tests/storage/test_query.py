"""storage/query.py: filters, time order across day files, limits, output forms."""

from __future__ import annotations

import csv
import io
import json
import shutil

import msgspec
import pytest

from storage.query import QueryError, parse_time, query, stream_output, to_json
from storage.records import Conn, Record
from tests.storage.conftest import DAYS, TZ, US, day_start, records_for


@pytest.fixture(scope="module")
def qstore(tmp_path_factory):
    from storage.config import StoreConfig
    from storage.writer import write_records
    from tests.storage.conftest import clock

    d = tmp_path_factory.mktemp("q") / "store"
    write_records(d, records_for(DAYS, 20), StoreConfig(), clock=clock)
    return d


def test_everything_comes_back_in_time_order_across_days(qstore):
    got = list(query(qstore))
    assert len(got) == 3 * 160 + 1
    assert [r.ts for r in got] == sorted(r.ts for r in got)
    want = sorted(records_for(DAYS, 20), key=lambda r: r.ts)
    assert [r for r in got if r.ts < day_start("2026-01-08")] == want


def test_since_until_select_one_day(qstore):
    got = list(query(qstore, since=day_start(DAYS[1]), until=day_start(DAYS[2])))
    assert len(got) == 160 and all(day_start(DAYS[1]) <= r.ts < day_start(DAYS[2]) for r in got)


def test_account_filter(qstore):
    got = list(query(qstore, account="user3"))
    assert got and all(r.account == "user3" for r in got)
    assert len(got) == 3 * 4 * 6  # 4 of every 20 per day; 6 of the 8 kinds carry an account
    assert list(query(qstore, account="nobody")) == []


def test_domain_matches_host_sni_qname_and_resolved_name_with_subdomains(qstore):
    got = list(query(qstore, domain="example.com", since=day_start(DAYS[0]), until=day_start(DAYS[1])))
    assert {r.__struct_config__.tag for r in got} == {"dns", "conn", "tls"}
    assert len(got) == 60
    assert {r.__struct_config__.tag for r in query(qstore, domain="EXAMPLE.org.")} == {"http"}
    assert list(query(qstore, domain="ample.com")) == []  # label boundary, not substring


def test_ip_filter_matches_client_nat_and_server_and_networks(qstore):
    assert len(list(query(qstore, ip="203.0.113.7"))) == 60  # conn records' NAT address
    assert len(list(query(qstore, ip="2001:db8::/32"))) == 60  # the http records (v6)
    got = list(query(qstore, ip="10.1.3.0/24", kind="dns"))
    assert got and all(r.client_ip.startswith("10.1.3.") for r in got)
    with pytest.raises(QueryError):
        list(query(qstore, ip="10.0.0.0/99"))


def test_action_kind_and_limit(qstore):
    assert {r.action for r in query(qstore, action="block")} == {"block"}
    assert len(list(query(qstore, kind=["session", "alarm"]))) == 120
    assert len(list(query(qstore, limit=7))) == 7
    assert len(list(query(qstore, kind="dns", limit=25))) == 25  # limit spans days
    with pytest.raises(QueryError, match="--kind"):
        list(query(qstore, kind="bogus"))


def test_missing_store_days_and_a_foreign_file_are_ignored(qstore, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(qstore, d)
    (d / "notes.txt").write_text("hello")
    assert len(list(query(d, since=day_start("2027-01-01")))) == 0


@pytest.mark.parametrize("text, want", [
    ("2026-01-05", day_start("2026-01-05")),
    ("2026-01-05T01:00", day_start("2026-01-05") + 3600 * US),
    ("2026-01-04T16:00:00Z", day_start("2026-01-05")),
    ("2026-01-05T00:00+08:00", day_start("2026-01-05")),
    ("1767542400000000", 1767542400000000),
])
def test_parse_time(text, want):
    assert parse_time(text, TZ) == want


def test_parse_relative_time():
    assert parse_time("7d", TZ, now=1_000_000.0) == int((1_000_000 - 7 * 86400) * US)
    with pytest.raises(QueryError):
        parse_time("last tuesday", TZ)


def test_json_is_the_struct_encoding_and_decodes_back(qstore):
    out = io.StringIO()
    n = stream_output(query(qstore, limit=16), "json", out, TZ)
    lines = out.getvalue().splitlines()
    assert n == 16 and len(lines) == 16
    recs = [msgspec.json.decode(line, type=Record.KINDS[json.loads(line)["kind"]]) for line in lines]
    assert [to_json(r).decode() for r in recs] == lines
    assert isinstance(json.loads(lines[0])["ts"], int)


def test_csv_has_every_field_and_one_row_per_record(qstore):
    out = io.StringIO()
    stream_output(query(qstore, limit=8), "csv", out, TZ)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 8 and {"kind", "ts", "qname", "sni", "alarm_kind"} <= set(rows[0])


def test_table_is_aligned_and_shows_local_time(qstore):
    out = io.StringIO()
    stream_output(query(qstore, limit=3), "table", out, TZ)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("time") and lines[1].startswith("2026-01-05 01:00:00")
    assert len({ln.index(" dns ") if " dns " in ln else None for ln in lines[1:2]}) == 1


def test_query_does_not_hold_all_days(qstore):
    it = query(qstore)
    first = next(it)
    assert isinstance(first, Conn.__mro__[1])  # a Record, produced before later days are read
    it.close()


def test_a_day_file_the_writer_is_still_creating_reads_as_empty(qstore, tmp_path):
    """The writer creates a day's file, then its tables: a query in between sees an
    empty database and must go on with the other days, not fail on a missing table."""
    from storage.partitions import day_path

    store = tmp_path / "store"
    shutil.copytree(qstore, store)
    before = list(query(store))
    late = day_path(store, "2999-01-01")
    late.parent.mkdir(parents=True, exist_ok=True)
    late.write_bytes(b"")  # what a reader can meet before the schema's transaction commits
    assert list(query(store)) == before
