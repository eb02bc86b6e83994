"""Helpers for the storage tests: deterministic records on fixed days, and a store built
through the real writer (no mocks)."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.communityid import community_id
from storage.config import StoreConfig
from storage.records import Alarm, Conn, Dns, Http, Maintenance, Record, Registration, Session, Tls
from storage.writer import write_records

TZ = zoneinfo.ZoneInfo("Asia/Shanghai")
US = 1_000_000
DAYS = ["2026-01-05", "2026-01-06", "2026-01-07"]


def day_start(day: str) -> int:
    d = dt.date.fromisoformat(day)
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=TZ).timestamp()) * US


NOW = day_start("2026-01-08") / US + 5 * 3600
"""A clock after the test days (and their close grace): they are closed and signed."""


def clock() -> float:
    return NOW


def one_of_each(ts: int, i: int = 0) -> list[Record]:
    """One record of every kind, exercising the compaction paths."""
    cip, sip = f"10.1.{i % 200}.{i % 250 + 1}", "93.184.216.34"
    cid = community_id("tcp", cip, 40000 + i, sip, 443)
    acct = f"user{i % 5}"
    return [
        Dns(ts=ts, uid=f"D{i}", account=acct, client_ip=cip, client_port=40000 + i, server_ip="10.0.0.1", server_port=53,
            community_id=community_id("udp", cip, 40000 + i, "10.0.0.1", 53), qname="www.Example.com", qtype=1,
            qtype_name="A", rcode=0, rcode_name="NOERROR", answers=[sip], dns_id=i, latency_us=1200),
        Conn(ts=ts + 1, uid=f"C{i}", account=acct, client_ip=cip, client_port=40000 + i, client_mac="02:00:00:00:00:01",
             nat_ip="203.0.113.7", nat_port=50000 + i, server_ip=sip, server_port=443, community_id=cid, service="tls",
             ts_end=ts + 5 * US, bytes_up=1234, bytes_down=98765, close_reason="fin", dns_name="www.example.com"),
        Tls(ts=ts + 2, uid=f"C{i}", account=acct, client_ip=cip, client_port=40000 + i, server_ip=sip, server_port=443,
            community_id=cid, sni="www.example.com", alpn=["h2", "http/1.1"], tls_version="TLSv1.3"),
        Http(ts=ts + 3, uid=f"H{i}", account=acct, client_ip="2001:db8::5", client_port=50123, server_ip="2001:db8::80",
             server_port=80, action="block", rule_ids=["kw-1", "url-2"], ruleset_version=3, community_id="1:not-the-hash",
             method="POST", host="bbs.example.org", url="/post?id=1", status=None, req_bytes=10, user_agent="UA/1.0",
             category="illegal", keyword="关键词", snippet="…关键词…", evidence="正文"),
        Session(ts=ts + 4, account=acct, client_ip=cip, phone="13800000000", method="portal", login_ts=ts),
        Registration(ts=ts + 5, account=acct, real_name="张三", id_type="id_card", id_number="110101199001011234"),
        Maintenance(ts=ts + 6, admin="root", operation="rules.push", target="v3", result="ok", source_ip="local"),
        Alarm(ts=ts + 7, action="log", alarm_kind="illegal_content", detail=f"{acct} posted"),
    ]


def records_for(days: list[str], per_day: int) -> Iterator[Record]:
    for day in days:
        start = day_start(day)
        for i in range(per_day):
            yield from one_of_each(start + 3600 * US + i * 10 * US, i)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A closed three-day store, 8 records x 20 per day, written by the real writer."""
    d = tmp_path / "store"
    write_records(d, records_for(DAYS, 20), StoreConfig(), clock=clock)
    return d


@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed store, 8 records x 5 per day, written once per module by the real writer."""
    d = tmp_path_factory.mktemp("template") / "store"
    write_records(d, records_for(DAYS, 5), StoreConfig(), clock=clock)
    return d


@pytest.fixture
def store_copy(template_store: Path, tmp_path: Path) -> Path:
    """A private copy of ``template_store`` that a test may change."""
    import shutil

    d = tmp_path / "store"
    shutil.copytree(template_store, d)
    return d
