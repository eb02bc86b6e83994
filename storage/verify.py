"""``linewarden verify``: is every record still the one that was written?

For each day file it recomputes the hash chain batch by batch (storage/chain.py rule 1)
from the rows as they are now, and checks that every row belongs to exactly one batch.
Then it holds the file against the digest log: the signed head must be in the file
(a replaced, re-chained or truncated file fails), a closed day must end where it was
signed, and a day the log knows must not be missing unless retention expired it.
Every problem names the day and, where there is one, the batch.

Read-only: opens files with ``mode=ro`` and never writes. Must not repair anything.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from linewarden import keys
from storage.chain import DIGEST_LOG, DigestEntry, batch_hash, genesis, read_digests
from storage.partitions import day_bounds, day_path, list_days, open_readonly, store_tz

US = 1_000_000


@dataclass(frozen=True, slots=True)
class Problem:
    day: str
    batch: int | None
    message: str

    def __str__(self) -> str:
        where = self.day if self.batch is None else f"{self.day} batch {self.batch}"
        return f"{where}: {self.message}"


@dataclass(slots=True)
class DayResult:
    day: str
    rows: int = 0
    batches: int = 0
    last_batch: int = -1
    hashes: dict[int, bytes] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


@dataclass(slots=True)
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    days: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_day_file(path: str | os.PathLike[str], day: str) -> DayResult:
    """Recompute the chain of one day file from its rows."""
    from storage.runs import by_id
    from storage.schema import RowDecoder

    res = DayResult(day)
    p = res.problems
    try:
        conn = open_readonly(path)
        meta_day = conn.execute("SELECT v FROM meta WHERE k = 'day'").fetchone()
    except sqlite3.Error as exc:
        p.append(Problem(day, None, f"cannot read the day file ({exc})"))
        return res
    try:
        if not meta_day or meta_day[0] != day:
            p.append(Problem(day, None, f"file belongs to day {meta_day and meta_day[0]!r} (replaced by another day's file)"))
        dec = RowDecoder(conn, preload=True)
        batches = conn.execute("SELECT n, first_id, last_id, hash FROM batches ORDER BY n").fetchall()
        rows = by_id(conn, dec)
        pending = next(rows, None)
        prev = genesis(day)
        expect_n, expect_first = 0, None
        for n, first, last, stored in batches:
            stored = bytes(stored)
            res.hashes[n] = stored
            if n != expect_n:
                p.append(Problem(day, n, f"batch numbers jump from {expect_n - 1} to {n} (batches removed)"))
            if expect_first is not None and first != expect_first:
                p.append(Problem(day, n, f"batch starts at row {first}, expected {expect_first} (rows or batches removed)"))
            logical, missing, bad = [], [], []
            want = first
            while pending is not None and pending[0] <= last:
                rid = pending[0]
                if rid < first:
                    p.append(Problem(day, n, f"row {rid} is in no batch (inserted)"))
                else:
                    missing.extend(range(want, rid))
                    want = rid + 1
                    try:
                        logical.append(pending[1]())
                    except Exception as exc:
                        bad.append(f"row {rid} cannot be decoded ({exc})")
                pending = next(rows, None)
            missing.extend(range(want, last + 1))
            if missing:
                p.append(Problem(day, n, f"{len(missing)} row(s) deleted (ids {_ranges(missing)})"))
            for b in bad:
                p.append(Problem(day, n, b + " (changed)"))
            if not missing and not bad:
                h, _ = batch_hash(prev, n, first, logical)
                if h != stored:
                    p.append(Problem(day, n, f"rows {first}-{last} changed (hash mismatch)"))
            res.rows += len(logical)
            prev, expect_n, expect_first = stored, n + 1, last + 1
            res.last_batch = n
        res.batches = len(batches)
        extra = []
        while pending is not None:
            extra.append(pending[0])
            pending = next(rows, None)
        if extra:
            p.append(Problem(day, res.last_batch, f"{len(extra)} row(s) after the last batch are in no batch (inserted: ids {_ranges(extra)})"))
    except sqlite3.Error as exc:
        p.append(Problem(day, None, f"cannot read the day file ({exc})"))
    finally:
        conn.close()
    return res


def _ranges(ids: list[int]) -> str:
    out, i = [], 0
    while i < len(ids) and len(out) < 5:
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out) + (", ..." if i < len(ids) else "")


def _latest_entries(store_dir: Path, public: Ed25519PublicKey | None, report: VerifyReport, days: set[str] | None) -> dict[str, DigestEntry]:
    latest: dict[str, DigestEntry] = {}
    for lineno, e, problem in read_digests(store_dir / DIGEST_LOG, public):
        if problem:
            report.problems.append(Problem(e.day if e else "digest-log", e.batch if e else None, problem))
        if e is not None and (days is None or e.day in days):
            latest[e.day] = e
    return latest


def verify_store(
    store_dir: str | os.PathLike[str],
    *,
    days: list[str] | None = None,
    public_key: str | os.PathLike[str] | None = None,
    now: float | None = None,
    close_grace_s: int = 3600,
) -> VerifyReport:
    """Check ``store_dir`` (or only ``days``). ``public_key``: a PEM file or key directory;
    default ``<store>/keys``. ``now`` decides which days should be closed by now."""
    d = Path(store_dir)
    report = VerifyReport()
    tz = store_tz(d)
    now = time.time() if now is None else now
    public = None
    key_src = Path(public_key) if public_key else d / "keys"
    try:
        public = keys.load_public(key_src)
        report.notes.append(f"signatures checked with {keys.fingerprint(public)} from {key_src}")
    except keys.KeyProblem as exc:
        report.problems.append(Problem("keys", None, f"cannot check signatures: {exc}"))
    wanted = set(days) if days else None
    latest = _latest_entries(d, public, report, wanted)
    files = [x for x in list_days(d) if wanted is None or x in wanted]
    for day in sorted(set(files) | set(latest) | (wanted or set())):
        e = latest.get(day)
        path = day_path(d, day)
        if not path.exists():
            if e is not None and e.event == "expired":
                report.notes.append(f"{day}: removed by retention (signed)")
            elif e is not None:
                report.problems.append(Problem(day, e.batch, "day file is missing (the digest log has its signed head)"))
            else:
                report.problems.append(Problem(day, None, "no day file and no digest entry"))
            continue
        res = verify_day_file(path, day)
        report.days += 1
        report.rows += res.rows
        report.problems.extend(res.problems)
        _check_against_digest(day, res, e, report, tz, now, close_grace_s)
    return report


def _check_against_digest(day: str, res: DayResult, e: DigestEntry | None, report: VerifyReport, tz, now: float, grace: int) -> None:
    _, end = day_bounds(day, tz)
    ended = end + grace * US <= now * US
    if e is None:
        if ended:
            report.problems.append(Problem(day, None, "day is over but its chain head was never signed (file added, or digest log truncated)"))
        else:
            report.notes.append(f"{day}: open day, no signed checkpoint yet ({res.batches} batches)")
        return
    if e.event == "expired":
        report.notes.append(f"{day}: restored after retention removed it")
        return
    if e.batch > res.last_batch:
        report.problems.append(Problem(day, e.batch, f"chain truncated: the file ends at batch {res.last_batch}, the digest log signed batch {e.batch}"))
        return
    stored = res.hashes.get(e.batch, genesis(day) if e.batch == -1 else None)
    if stored is None or stored.hex() != e.head:
        report.problems.append(Problem(day, e.batch, "chain head does not match the signed digest (day file replaced or re-chained)"))
        return
    if res.last_batch > e.batch:
        extra = res.last_batch - e.batch
        if e.final:
            report.problems.append(Problem(day, e.batch + 1, f"{extra} batch(es) appended after the day was closed and signed"))
        else:
            report.notes.append(f"{day}: {extra} batch(es) after the last signed checkpoint (signed at the next checkpoint)")
    elif ended and not e.final:
        report.notes.append(f"{day}: day is over but not yet closed by the writer")


def iter_report_lines(report: VerifyReport) -> Iterator[str]:
    for p in report.problems:
        yield f"FAIL {p}"
    for n in report.notes:
        yield f"note {n}"
    yield ("OK" if report.ok else "FAILED") + f": {report.days} day(s), {report.rows:,} record(s) checked, {len(report.problems)} problem(s)"
