"""Retention and free space: which whole days have expired, and when the disk is low.

Only whole days are deleted, and only at rollover, and only when older than
``retention_days`` (>= 60, Order No. 82 art. 13; default 180, Cybersecurity Law art. 21).
Days written by a forensic import (meta ``forensic``) and every day of a forensic store
are never expired. Nothing inside retention is ever deleted to make room: low disk space
raises a ``disk_low`` alarm instead. Pure functions plus the one deletion; the writer
decides when to call them and signs the ``expired`` entry before deleting.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from storage.config import StoreConfig
from storage.partitions import add_days, day_path, is_forensic, list_days, open_readonly


def expired_days(days: list[str], today: str, config: StoreConfig) -> list[str]:
    """Days strictly older than ``today - retention_days`` (so ``retention_days`` full days
    before today are always kept), never in a forensic store."""
    if config.forensic:
        return []
    cutoff = add_days(today, -config.retention_days)
    return [d for d in days if d < cutoff]


def deletable(store_dir: str | os.PathLike[str], day: str) -> bool:
    """False for a day file written by a forensic import."""
    try:
        conn = open_readonly(day_path(store_dir, day))
    except Exception:
        return True
    try:
        return not is_forensic(conn)
    except Exception:
        return True
    finally:
        conn.close()


def remove_day(store_dir: str | os.PathLike[str], day: str) -> None:
    p = day_path(store_dir, day)
    for suffix in ("-wal", "-shm", ""):
        Path(f"{p}{suffix}").unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class DiskStatus:
    free: int
    total: int
    low: bool

    def describe(self, bytes_per_day: float | None = None) -> str:
        s = f"{self.free / 1e9:.1f} GB free of {self.total / 1e9:.1f} GB ({100 * self.free / max(self.total, 1):.1f}%)"
        if bytes_per_day:
            s += f", about {self.free / bytes_per_day:.0f} days at the current rate"
        return s


def disk_status(store_dir: str | os.PathLike[str], config: StoreConfig) -> DiskStatus:
    u = shutil.disk_usage(store_dir)
    low = u.free < config.disk_low_bytes or 100 * u.free / max(u.total, 1) < config.disk_low_percent
    return DiskStatus(u.free, u.total, low)


def days_that_fit(disk_bytes: float, records_per_day: float, bytes_per_record: float) -> float:
    """How many days of a given traffic fit on a given disk (the README's table)."""
    return disk_bytes / (records_per_day * bytes_per_record)


def store_bytes(store_dir: str | os.PathLike[str]) -> int:
    total = 0
    for d in list_days(store_dir):
        p = day_path(store_dir, d)
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(f"{p}{suffix}")
            except FileNotFoundError:
                pass
    return total
