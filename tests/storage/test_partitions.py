"""storage/partitions.py: days in the store's zone, DST, routing."""

from __future__ import annotations

import zoneinfo

from storage.partitions import DayRouter, add_days, day_bounds, day_of, list_days

SH = zoneinfo.ZoneInfo("Asia/Shanghai")
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def test_day_of_uses_the_zone():
    ts = 1_767_542_400_000_000  # 2026-01-04T16:00:00Z = 2026-01-05 00:00 in Shanghai
    assert day_of(ts, SH) == "2026-01-05"
    assert day_of(ts - 1, SH) == "2026-01-04"
    assert day_of(ts, zoneinfo.ZoneInfo("UTC")) == "2026-01-04"


def test_bounds_follow_dst():
    lo, hi = day_bounds("2026-03-29", BERLIN)  # clocks go forward: a 23-hour day
    assert hi - lo == 23 * 3600 * 1_000_000
    lo, hi = day_bounds("2026-01-05", SH)
    assert hi - lo == 86400 * 1_000_000 and day_of(lo, SH) == "2026-01-05" and day_of(hi, SH) == "2026-01-06"


def test_router_agrees_with_day_of():
    r = DayRouter(SH)
    base = 1_767_542_400_000_000
    for ts in [base - 1, base, base + 1, base + 86_400_000_000, base - 5, base + 3]:
        assert r(ts) == day_of(ts, SH)


def test_list_days_ignores_other_files(tmp_path):
    for n in ("2026-01-05.sqlite", "2026-01-05.sqlite-wal", "notes.sqlite", "2026-01-04.sqlite", "digests.log"):
        (tmp_path / n).write_text("")
    assert list_days(tmp_path) == ["2026-01-04", "2026-01-05"]
    assert add_days("2026-01-05", -180) == "2025-07-09"
