"""StoreConfig: every knob of the audit store, with its default and the reason for it.

Owns validation of the configuration (a bad value raises ``StoreConfigError``
naming the field and the value, before anything is opened). Must not open files
or read the clock.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass, fields
from typing import Literal

from rules.errors import LinewardenError

MIN_RETENTION_DAYS = 60
"""Ministry of Public Security Order No. 82, art. 13: records are kept at least 60 days."""

DEFAULT_RETENTION_DAYS = 180
"""Cybersecurity Law art. 21: network logs are kept no less than six months."""

Overflow = Literal["fail-open", "fail-closed"]


class StoreConfigError(LinewardenError, ValueError):
    """A StoreConfig field has a value the store refuses (the operator's fault)."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """How the audit store writes, keeps, signs and forwards records."""

    retention_days: int = DEFAULT_RETENTION_DAYS
    """Whole days kept; older day files are deleted at rollover. Default 180 (Cybersecurity
    Law art. 21); below 60 (Order No. 82 art. 13) the store refuses to start."""

    timezone: str = "Asia/Shanghai"
    """IANA zone whose calendar day names a partition (one SQLite file per day). Default the
    zone of the units this is built for, so "day D" is the day an investigator means."""

    batch_max: int = 20_000
    """Records per group commit at most. Under load each transaction pays a fixed part (the
    fsync, and the encoder/SQLite pipeline filling at its start and draining at its end);
    20,000 records spread it thinly enough for >50k records/s (5,000 measured ~15 % slower,
    benchmarks/bench_store.py), and a transaction is then ~0.3 s of work at full load.
    Under light load the ``commit_interval_ms`` bound commits first."""

    commit_interval_ms: int = 200
    """Longest a submitted record waits before its batch is committed (the issue's bound);
    also the most a SIGKILL can lose of records not yet acknowledged."""

    queue_max: int = 200_000
    """Bound of the in-memory queue between producers and the writer task: about 4 s of a
    busy line at 50k records/s, ~100 MB worst case. Beyond it the overflow policy applies."""

    overflow: Overflow = "fail-open"
    """Queue full: ``fail-open`` drops the record, counts it and writes a ``queue_overflow``
    alarm as soon as it can; ``fail-closed`` makes ``submit`` return False so the adapter
    refuses the new flow (and the refusals are alarmed the same way). Never a silent drop."""

    forensic: bool = False
    """A case store (``replay --store``): records keep their capture time and days written
    by it are never expired by the retention clock (kept until deleted on purpose)."""

    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    """SQLite ``synchronous`` in WAL mode. FULL fsyncs every group commit, so an acknowledged
    record survives power loss as well as ``kill -9``; at 5 commits/s the cost is small."""

    close_grace_s: int = 3600
    """Seconds after midnight before yesterday is closed (final hash signed): records of
    connections that straddle midnight still land in their own day. A record arriving
    later re-opens the day and the final hash is signed again."""

    sign_interval_s: int = 300
    """Seconds between signed checkpoints of open days' chain heads in the digest log. Bounds
    how much of an open day could be re-chained unnoticed by someone without the key."""

    key_dir: str | None = None
    """Directory of the Ed25519 signing key (``linewarden keys init``). None means
    ``<store>/keys``, created on first start so that the defaults run."""

    disk_low_percent: float = 10.0
    """Free space (percent of the file system) below which a ``disk_low`` alarm is written,
    well before the disk is full. Nothing inside retention is deleted to make room."""

    disk_low_bytes: int = 2 * 1024**3
    """Free bytes below which ``disk_low`` is alarmed, whatever the percentage (small disks)."""

    housekeeping_s: float = 30.0
    """Seconds between checks for rollover, retention and free disk space."""

    max_open_days: int = 4
    """Day files kept open at once; a forensic import touching many days closes the least
    recently used ones (each open day costs a connection thread)."""

    syslog: str | None = None
    """Forward every committed record as RFC 5424 syslog, e.g. ``udp://10.0.0.5:514`` or
    ``tcp://siem:601``. None: no forwarding. Best effort: the store is the record of truth."""

    def __post_init__(self) -> None:
        if not isinstance(self.retention_days, int) or self.retention_days < MIN_RETENTION_DAYS:
            raise StoreConfigError(
                f"retention_days={self.retention_days!r} is below the legal minimum of "
                f"{MIN_RETENTION_DAYS} days (Ministry of Public Security Order No. 82, art. 13); "
                f"the default is {DEFAULT_RETENTION_DAYS} (Cybersecurity Law art. 21)"
            )
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise StoreConfigError(f"timezone={self.timezone!r} is not a known IANA time zone") from exc
        for name in ("batch_max", "commit_interval_ms", "queue_max", "sign_interval_s", "max_open_days"):
            if getattr(self, name) < 1:
                raise StoreConfigError(f"{name}={getattr(self, name)!r} must be at least 1")
        if self.overflow not in ("fail-open", "fail-closed"):
            raise StoreConfigError(f"overflow={self.overflow!r} must be 'fail-open' or 'fail-closed'")
        if self.synchronous not in ("FULL", "NORMAL"):
            raise StoreConfigError(f"synchronous={self.synchronous!r} must be 'FULL' or 'NORMAL'")
        if self.syslog is not None:
            from storage.export import parse_syslog_target

            try:
                parse_syslog_target(self.syslog)
            except ValueError as exc:
                raise StoreConfigError(f"syslog={self.syslog!r}: {exc}") from exc

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


def config_fields() -> list[str]:
    """Field names, for the docs."""
    return [f.name for f in fields(StoreConfig)]
