"""storage/writer.py: submit never waits, group commit, overflow policies, day close,
retention, bad records, flush and close."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from storage.chain import read_digests
from storage.config import StoreConfig
from storage.partitions import day_path, list_days
from storage.query import query
from storage.records import Alarm, Conn, Maintenance
from storage.verify import verify_store
from storage.writer import RecordWriter, write_records
from tests.storage.conftest import DAYS, NOW, US, clock, day_start, one_of_each, records_for


def count(store: Path, day: str) -> int:
    with sqlite3.connect(day_path(store, day)) as c:
        return c.execute("SELECT count(*) FROM rec").fetchone()[0]


def kinds(store: Path, kind: str) -> list:
    return list(query(store, kind=kind))


async def test_submit_flush_close_and_every_record_is_back(tmp_path):
    w = RecordWriter(tmp_path / "s", StoreConfig(), clock=clock)
    await w.start()
    recs = list(records_for(DAYS[:1], 10))
    assert all(w.submit(r) for r in recs)
    await w.flush()
    assert w.committed == len(recs)
    await w.close()
    got = [r for r in query(tmp_path / "s") if not (isinstance(r, Maintenance) and r.operation == "keys.init")]
    assert sorted(got, key=lambda r: r.ts) == sorted(recs, key=lambda r: r.ts)


async def test_group_commit_happens_within_the_interval_without_flush(tmp_path):
    cfg = StoreConfig(commit_interval_ms=100)
    w = RecordWriter(tmp_path / "s", cfg, clock=clock)
    await w.start()
    t0 = time.monotonic()
    w.submit(Conn(ts=day_start(DAYS[0]) + 1))
    while w.committed < 1 and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - t0
    await w.close()
    assert w.committed == 1
    assert elapsed < 2.0  # bound is 100 ms + one commit; generous for loaded CI machines


async def test_batch_max_triggers_a_commit_before_the_interval(tmp_path):
    cfg = StoreConfig(commit_interval_ms=60_000, batch_max=50)
    w = RecordWriter(tmp_path / "s", cfg, clock=clock)
    await w.start()
    for i in range(50):
        w.submit(Conn(ts=day_start(DAYS[0]) + i))
    t0 = time.monotonic()
    while w.committed < 50 and time.monotonic() - t0 < 10:
        await asyncio.sleep(0.01)
    assert w.committed == 50  # long before the 60 s interval
    await w.close()


async def test_submit_never_awaits_and_is_cheap(tmp_path):
    w = RecordWriter(tmp_path / "s", StoreConfig(), clock=clock)
    await w.start()
    recs = [Conn(ts=day_start(DAYS[0]) + i) for i in range(5_000)]
    t0 = time.perf_counter()
    for r in recs:
        w.submit(r)  # a plain call: no coroutine, no await
    per = (time.perf_counter() - t0) / len(recs)
    await w.close()
    assert per < 50e-6


async def test_fail_open_overflow_drops_counts_and_alarms(tmp_path):
    cfg = StoreConfig(queue_max=10, overflow="fail-open")
    w = RecordWriter(tmp_path / "s", cfg, clock=clock)
    await w.start()
    results = [w.submit(Conn(ts=day_start(DAYS[0]) + i)) for i in range(25)]
    assert all(results)  # fail-open: the data path carries on
    assert w.dropped == 15
    await w.close()
    alarms = [a for a in kinds(tmp_path / "s", "alarm") if a.alarm_kind == "queue_overflow"]
    assert len(alarms) == 1 and "15 records dropped" in alarms[0].detail
    assert len(kinds(tmp_path / "s", "conn")) == 10


async def test_fail_closed_overflow_refuses_and_alarms(tmp_path):
    cfg = StoreConfig(queue_max=10, overflow="fail-closed")
    w = RecordWriter(tmp_path / "s", cfg, clock=clock)
    await w.start()
    results = [w.submit(Conn(ts=day_start(DAYS[0]) + i)) for i in range(12)]
    assert results == [True] * 10 + [False] * 2
    await w.flush()
    assert w.submit(Conn(ts=day_start(DAYS[0]) + 99))  # room again after the commit
    await w.close()
    alarms = [a for a in kinds(tmp_path / "s", "alarm") if a.alarm_kind == "queue_overflow"]
    assert len(alarms) == 1 and "2 records refused" in alarms[0].detail


async def test_a_bad_record_becomes_an_alarm_carrying_it(tmp_path):
    w = RecordWriter(tmp_path / "s", StoreConfig(), clock=clock)
    await w.start()
    w.submit(Conn(ts=day_start(DAYS[0]), client_port="eighty"))  # type: ignore[arg-type]
    w.submit("not a record")  # type: ignore[arg-type]
    w.submit(Conn(ts=day_start(DAYS[0]) + 1))
    await w.close()
    bad = [a for a in kinds(tmp_path / "s", "alarm") if a.alarm_kind == "bad_record"]
    assert len(bad) == 2 and any("eighty" in a.detail for a in bad)
    assert len(kinds(tmp_path / "s", "conn")) == 1
    assert verify_store(tmp_path / "s", now=NOW).ok


async def test_records_go_to_the_day_of_their_ts_in_the_store_zone(tmp_path):
    # 2026-01-05 23:59:59 and 2026-01-06 00:00:00 Asia/Shanghai are 16:00 UTC apart by a second.
    d1 = day_start("2026-01-06")
    write_records(tmp_path / "s", [Conn(ts=d1 - 1), Conn(ts=d1)], clock=clock)
    assert list_days(tmp_path / "s")[:2] == ["2026-01-05", "2026-01-06"]
    assert [count(tmp_path / "s", d) for d in ("2026-01-05", "2026-01-06")] == [1, 1]


def test_write_records_works_inside_a_running_loop(tmp_path):
    async def inside():
        return write_records(tmp_path / "s", one_of_each(day_start(DAYS[0])), clock=clock)

    assert asyncio.run(inside()) == 8


async def test_day_close_signs_final_head_and_late_record_reopens(tmp_path):
    now = [day_start(DAYS[0]) / US + 3600]
    cfg = StoreConfig(housekeeping_s=0.05)
    w = RecordWriter(tmp_path / "s", cfg, clock=lambda: now[0])
    await w.start()
    w.submit(Conn(ts=day_start(DAYS[0]) + 10))
    await w.flush()
    now[0] = day_start(DAYS[1]) / US + 2 * 3600  # a day later, past the close grace
    await asyncio.sleep(0.3)
    entries = [e for _, e, _ in read_digests(tmp_path / "s" / "digests.log", None)]
    assert any(e.day == DAYS[0] and e.event == "close" for e in entries)
    w.submit(Conn(ts=day_start(DAYS[0]) + 20))  # a late record for the closed day
    await w.close()
    finals = [e for _, e, _ in read_digests(tmp_path / "s" / "digests.log", None) if e.day == DAYS[0] and e.event == "close"]
    assert [f.batch for f in finals] == [0, 1]
    assert verify_store(tmp_path / "s", now=now[0]).ok
    assert len(list(query(tmp_path / "s", kind="conn"))) == 2


async def test_retention_removes_whole_expired_days_at_rollover_and_signs_it(tmp_path):
    s = tmp_path / "s"
    write_records(s, [Conn(ts=day_start("2026-01-01")), Conn(ts=day_start("2026-03-01"))], clock=clock)
    later = day_start("2026-03-05") / US + 60  # 2026-01-01 is 63 days old: beyond retention 60
    w = RecordWriter(s, StoreConfig(retention_days=60), clock=lambda: later)
    await w.start()
    await w.close()
    assert "2026-01-01" not in list_days(s) and "2026-03-01" in list_days(s)
    entries = [e for _, e, _ in read_digests(s / "digests.log", None)]
    assert any(e.day == "2026-01-01" and e.event == "expired" for e in entries)
    rep = verify_store(s, now=later)
    assert rep.ok and any("removed by retention" in n for n in rep.notes)


async def test_forensic_days_are_never_expired(tmp_path):
    s = tmp_path / "case"
    write_records(s, [Conn(ts=day_start("2025-01-01"))], StoreConfig(forensic=True), clock=clock)
    # a live writer (retention 60) opening the same directory keeps the imported day
    w = RecordWriter(s, StoreConfig(retention_days=60), clock=clock)
    await w.start()
    await w.close()
    assert list_days(s)[0] == "2025-01-01"


async def test_disk_low_raises_an_alarm(tmp_path):
    w = RecordWriter(tmp_path / "s", StoreConfig(disk_low_percent=100.0), clock=clock)
    await w.start()
    await w.close()
    alarms = [a for a in kinds(tmp_path / "s", "alarm") if a.alarm_kind == "disk_low"]
    assert len(alarms) == 1 and "free of" in alarms[0].detail


async def test_one_writer_per_store(tmp_path):
    from storage.config import StoreConfigError

    a = RecordWriter(tmp_path / "s", StoreConfig(), clock=clock)
    await a.start()
    b = RecordWriter(tmp_path / "s", StoreConfig(), clock=clock)
    with pytest.raises(StoreConfigError, match="another writer"):
        await b.start()
    await a.close()


async def test_timezone_of_a_store_cannot_change(tmp_path):
    from storage.config import StoreConfigError

    write_records(tmp_path / "s", [Conn(ts=day_start(DAYS[0]))], clock=clock)
    w = RecordWriter(tmp_path / "s", StoreConfig(timezone="UTC"), clock=clock)
    with pytest.raises(StoreConfigError, match="Asia/Shanghai"):
        await w.start()


async def test_signed_checkpoints_of_an_open_day(tmp_path):
    now = day_start(DAYS[0]) / US + 3600
    w = RecordWriter(tmp_path / "s", StoreConfig(sign_interval_s=1, housekeeping_s=0.05), clock=lambda: now)
    await w.start()
    w.submit(Conn(ts=int(now * US)))
    await w.flush()
    w._days[DAYS[0]].last_sign -= 5  # as if the interval had passed
    await asyncio.sleep(0.3)
    entries = [e for _, e, _ in read_digests(tmp_path / "s" / "digests.log", None) if e.day == DAYS[0]]
    assert entries and entries[0].event == "checkpoint"
    await w.close()


def test_alarm_times_come_from_the_clock(tmp_path):
    cfg = StoreConfig(queue_max=1)

    async def go():
        w = RecordWriter(tmp_path / "s", cfg, clock=clock)
        await w.start()
        w.submit(Conn(ts=day_start(DAYS[0])))
        w.submit(Conn(ts=day_start(DAYS[0])))
        await w.close()

    asyncio.run(go())
    a = [r for r in query(tmp_path / "s", kind="alarm")][0]
    assert isinstance(a, Alarm) and a.ts == int(NOW * US)


async def test_restart_does_not_sign_over_a_change_made_while_down(tmp_path):
    import sqlite3

    s = tmp_path / "s"
    write_records(s, [Conn(ts=day_start(DAYS[0]) + i) for i in range(3)], StoreConfig(batch_max=1), clock=clock)
    with sqlite3.connect(day_path(s, DAYS[0])) as c:  # truncate the closed day, then append a forged batch
        c.execute("UPDATE batches SET hash = zeroblob(32) WHERE n = 2")
        c.execute("INSERT INTO batches SELECT 3, 4, 4, min_ts, max_ts, hash FROM batches WHERE n = 2")
    w = RecordWriter(s, StoreConfig(), clock=clock)
    await w.start()
    await w.close()
    alarms = [a for a in query(s, kind="alarm") if a.alarm_kind == "integrity_failure"]
    assert len(alarms) == 1 and DAYS[0] in alarms[0].detail
    assert not verify_store(s, now=NOW).ok


async def test_a_failed_commit_is_rolled_back_and_retried_without_loss(tmp_path):
    """A real failure: another connection takes the batch number the writer needs next, so
    its commit fails (UNIQUE) and rolls back; once the row is gone the retry succeeds."""
    s = tmp_path / "s"
    w = RecordWriter(s, StoreConfig(commit_interval_ms=10), clock=clock)
    await w.start()
    w.submit(Conn(ts=day_start(DAYS[0]), account="first"))
    await w.flush()
    with sqlite3.connect(day_path(s, DAYS[0])) as c:
        c.execute("INSERT INTO batches VALUES (1, 999, 999, 0, 0, zeroblob(32))")
    for i in range(3):
        w.submit(Conn(ts=day_start(DAYS[0]) + 1 + i, account=f"new-account-{i}", dns_name=f"n{i}.example"))
    await asyncio.sleep(0.8)
    assert w.committed == 1 and w.last_error is not None  # failing and retrying
    with sqlite3.connect(day_path(s, DAYS[0])) as c:
        c.execute("DELETE FROM batches WHERE first_id = 999")
    await asyncio.wait_for(w.flush(), 30)
    await w.close()
    assert {r.account for r in query(s, kind="conn")} == {"first", "new-account-0", "new-account-1", "new-account-2"}
    assert len(list(query(s, domain="example"))) == 3
    assert verify_store(s, now=NOW).ok


async def test_a_batch_of_many_chunks_is_one_transaction_with_every_record_back(tmp_path):
    """Rows go in as multi-row INSERTs (storage.schema.chunk_plan): a batch of several
    such chunks, with a bad record in the middle (a domain that is not a str, which once
    made the whole batch retry forever), comes back whole, in id order, as one batch of
    the chain, with the bad record as an alarm."""
    from storage.schema import ROWS_PER_INSERT

    s = tmp_path / "s"
    n = 2 * ROWS_PER_INSERT + 77
    recs = [Conn(ts=day_start(DAYS[0]) + i, uid=f"c{i}", account=f"a{i % 7}", dns_name=f"h{i % 11}.example")
            for i in range(n)]
    recs[ROWS_PER_INSERT + 3] = Conn(ts=day_start(DAYS[0]) + 5, dns_name=5)  # type: ignore[arg-type]
    w = RecordWriter(s, StoreConfig(batch_max=10 * n), clock=clock)
    await w.start()
    for r in recs:
        w.submit(r)
    await w.close()
    with sqlite3.connect(day_path(s, DAYS[0])) as c:
        ids = [r[0] for r in c.execute("SELECT id FROM rec ORDER BY id")]
        batches = c.execute("SELECT first_id, last_id FROM batches").fetchall()
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert any(last - first + 1 == n for first, last in batches)
    conns = kinds(s, "conn")
    assert {r.uid for r in conns} == {f"c{i}" for i in range(n)} - {f"c{ROWS_PER_INSERT + 3}"}
    bad = [a for a in kinds(s, "alarm") if a.alarm_kind == "bad_record"]
    assert len(bad) == 1 and "dns_name" in bad[0].detail
    assert len(list(query(s, domain="h3.example"))) == len([i for i in range(n) if i % 11 == 3 and i != ROWS_PER_INSERT + 3])
    assert verify_store(s, now=NOW).ok


async def test_a_chunk_failing_mid_batch_rolls_the_whole_batch_back_and_retries(tmp_path):
    """Another connection takes a row id that the second chunk of the next batch needs: that
    chunk's INSERT fails after the first went in; the batch rolls back whole and is
    retried, and nothing is lost or half-written once the id is free again."""
    from storage.schema import ROWS_PER_INSERT

    s = tmp_path / "s"
    w = RecordWriter(s, StoreConfig(commit_interval_ms=10, batch_max=100_000), clock=clock)
    await w.start()
    w.submit(Conn(ts=day_start(DAYS[0]), account="first"))
    await w.flush()
    n = 3 * ROWS_PER_INSERT
    with sqlite3.connect(day_path(s, DAYS[0])) as c:
        next_id = c.execute("SELECT max(id) FROM rec").fetchone()[0] + 1
        c.execute("INSERT INTO rec(id, kind, ts) VALUES (?, 0, 0)", (next_id + ROWS_PER_INSERT + 5,))
    for i in range(n):
        w.submit(Conn(ts=day_start(DAYS[0]) + 1 + i, uid=f"m{i}", account=f"new-{i % 3}"))
    await asyncio.sleep(0.8)
    assert w.committed == 1 and w.last_error is not None
    with sqlite3.connect(day_path(s, DAYS[0])) as c:
        assert c.execute("SELECT count(*) FROM rec").fetchone()[0] == 2  # nothing half-written
        c.execute("DELETE FROM rec WHERE id = ?", (next_id + ROWS_PER_INSERT + 5,))
    await asyncio.wait_for(w.flush(), 30)
    await w.close()
    assert {r.uid for r in query(s, kind="conn") if r.uid} == {f"m{i}" for i in range(n)}
    assert verify_store(s, now=NOW).ok


async def test_the_switch_interval_is_short_while_a_writer_runs_and_restored_after(tmp_path):
    """The encoder, SQL and loop threads hand the GIL around several times per chunk
    (storage.writer.GIL_SWITCH_S); the process's own setting comes back at close."""
    import sys

    from storage.writer import GIL_SWITCH_S

    before = sys.getswitchinterval()
    w = RecordWriter(tmp_path / "s", StoreConfig(commit_interval_ms=10), clock=clock)
    await w.start()
    assert sys.getswitchinterval() == pytest.approx(min(before, GIL_SWITCH_S))
    w.submit(Conn(ts=day_start(DAYS[0]), account="a"))
    await w.close()
    assert sys.getswitchinterval() == pytest.approx(before)
