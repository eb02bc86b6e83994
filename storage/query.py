"""``linewarden query``: records across day files, in time order, filtered, streamed.

Days are visited in order and each day's rows come out ``ORDER BY ts, id``, so the
stream is in time order without holding more than one day's cursor. Filters become SQL
on the indexed columns: ``--account`` uses the account index, ``--domain`` a range on the
reversed-name key then the domain index (matches are sorted by ts after the lookup); a
bare time range narrows the rowid range with the
per-batch min/max ts. Output helpers: aligned table, JSON lines, CSV.

The JSON form of a record is msgspec's encoding of its Struct: flat snake_case fields
plus ``kind``; ``ts`` and every other time are integers, microseconds since the Unix epoch,
UTC (lossless, sortable, what Zeek-style tools expect). The table shows local time.

Read-only. Must not load more than one day's cursor at a time or write to the store.
"""

from __future__ import annotations

import csv
import heapq
import datetime as dt
import io
import ipaddress
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from storage.partitions import day_of, day_path, has_schema, list_days, open_readonly, store_tz
from storage.records import RECORD_TYPES, Record
from storage.runs import Runs
from storage.schema import ACTIONS, RowDecoder, domain_key, ipv4_db

US = 1_000_000
_REL = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class QueryError(ValueError):
    """A query argument the user must fix (bad time, address or kind)."""


def parse_time(text: str, tz: dt.tzinfo, now: float | None = None) -> int:
    """``2026-11-28``, ``2026-11-28T10:00`` (store zone unless an offset is given), an epoch
    in µs, or a relative ``30m``/``24h``/``7d`` (that long before now) -> µs since the epoch."""
    s = text.strip()
    m = _REL.match(s)
    if m:
        base = time.time() if now is None else now
        return int((base - int(m.group(1)) * _UNITS[m.group(2)]) * US)
    if s.isdigit() and len(s) >= 13:
        return int(s)
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"cannot read time {text!r}: use 2026-11-28, 2026-11-28T10:00[+08:00], 7d, 24h or µs since the epoch") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=tz)
    return int(t.timestamp() * US)


@dataclass(frozen=True, slots=True)
class Filters:
    since: int | None = None
    """Inclusive lower bound of ``ts`` (µs)."""
    until: int | None = None
    """Exclusive upper bound of ``ts`` (µs)."""
    account: str | None = None
    ip: str | None = None
    """An address or network: matches client, NAT or server address."""
    domain: str | None = None
    """Matches host, SNI, qname and a conn's resolved name: the name and its subdomains."""
    action: str | None = None
    kinds: tuple[str, ...] = ()


def _ip_clause(ip: str) -> tuple[str, list[object]]:
    cols = ("client_ip", "server_ip", "nat_ip")
    try:
        net = ipaddress.ip_network(ip, strict=False)
    except ValueError:
        if not ip or "/" in ip:
            raise QueryError(f"--ip {ip!r} is not an address or network") from None
        # Not canonical (e.g. "010.1.1.1"): such values are stored verbatim as text.
        return "(" + " OR ".join(f"{c} = ?" for c in cols) + ")", [ip] * 3
    if net.version == 4:
        lo, hi = ipv4_db(int(net.network_address)), ipv4_db(int(net.broadcast_address))
    else:
        lo, hi = net.network_address.packed, net.broadcast_address.packed  # type: ignore[assignment]
    sql = " OR ".join(f"({c} BETWEEN ? AND ?)" for c in cols) + " OR " + " OR ".join(f"{c} = ?" for c in cols)
    return f"({sql})", [lo, hi] * 3 + [ip] * 3


def _day_sql(conn: sqlite3.Connection, f: Filters, *, timeless: bool = False) -> tuple[str, list[object]] | None:
    """The WHERE clause for one day file, or None when the day cannot match. ``timeless``:
    without the conditions on ts and id (for the prototypes of runs, storage/runs.py)."""
    where, args = [], []
    if f.since is not None and not timeless:
        where.append("ts >= ?")
        args.append(f.since)
    if f.until is not None and not timeless:
        where.append("ts < ?")
        args.append(f.until)
    if f.account is not None:
        row = conn.execute("SELECT id FROM strs WHERE v = ?", (f.account,)).fetchone()
        if row is None:
            return None
        where.append("account = ?")
        args.append(row[0])
    if f.domain is not None:
        k = domain_key(f.domain)
        ids = [r[0] for r in conn.execute("SELECT id FROM strs WHERE rkey = ? OR (rkey > ? AND rkey < ?)", (k, k + ".", k + "/"))]
        if not ids:
            return None
        where.append(f"domain IN ({','.join('?' * len(ids))})" if len(ids) <= 500 else
                     "domain IN (SELECT id FROM strs WHERE rkey = ? OR (rkey > ? AND rkey < ?))")
        args.extend(ids if len(ids) <= 500 else [k, k + ".", k + "/"])
    if (f.since is not None or f.until is not None) and f.account is None and f.domain is None and not timeless:
        lo, hi = conn.execute(
            "SELECT min(first_id), max(last_id) FROM batches WHERE max_ts >= ? AND min_ts < ?",
            (f.since if f.since is not None else -(2**62), f.until if f.until is not None else 2**62),
        ).fetchone()
        if lo is None:
            return None
        where.append("id BETWEEN ? AND ?")
        args.extend((lo, hi))
    if f.ip is not None:
        sql, a = _ip_clause(f.ip)
        where.append(sql)
        args.extend(a)
    if f.action is not None:
        where.append("action = ?")
        args.append(ACTIONS.index(f.action) if f.action in ACTIONS else f.action)
    if f.kinds:
        where.append(f"kind IN (SELECT code FROM kinds WHERE tag IN ({','.join('?' * len(f.kinds))}))")
        args.extend(f.kinds)
    return (" AND ".join(where) or "1"), args


def query(
    store_dir: str | os.PathLike[str],
    *,
    since: int | None = None,
    until: int | None = None,
    account: str | None = None,
    ip: str | None = None,
    domain: str | None = None,
    action: str | None = None,
    kind: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> Iterator[Record]:
    """Matching records of ``store_dir`` in time order (``ts``, then write order). Times
    are µs since the epoch (``parse_time`` reads the CLI forms); ``until`` is exclusive."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind or ())
    known = {t.__struct_config__.tag for t in RECORD_TYPES}  # type: ignore[misc]
    for k in kinds:
        if k not in known:
            raise QueryError(f"--kind {k!r}: one of {', '.join(sorted(known))}")
    if action is not None and action not in ACTIONS:
        raise QueryError(f"--action {action!r}: one of {', '.join(ACTIONS)}")
    f = Filters(since, until, account, ip, domain, action, kinds)
    if ip is not None:
        _ip_clause(ip)
    tz = store_tz(store_dir)
    first = day_of(since, tz) if since is not None else None
    last = day_of(until - 1, tz) if until is not None else None
    left = limit
    for day in list_days(store_dir):
        if (first and day < first) or (last and day > last):
            continue
        if left is not None and left <= 0:
            return
        conn = open_readonly(day_path(store_dir, day))
        try:
            if not has_schema(conn):
                continue  # being created by the writer this very moment: nothing in it yet
            for rec in _day_records(conn, f, left):
                yield rec
                if left is not None:
                    left -= 1
                    if left <= 0:
                        break
        finally:
            conn.close()


def _day_records(conn: sqlite3.Connection, f: Filters, limit: int | None) -> Iterator[Record]:
    """The matching records of one day file in (ts, id) order: its ``rec`` rows and its
    runs' records (storage/runs.py) merged."""
    dec = RowDecoder(conn)
    plan = _day_sql(conn, f)
    rows: Iterator[tuple[int, int, Any]] = iter(())
    if plan is not None:
        sql = f"SELECT * FROM rec WHERE {plan[0]} ORDER BY ts, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = ((row[2], row[0], dec.record(row)) for row in conn.execute(sql, plan[1]))
    timeless = _day_sql(conn, f, timeless=True)
    copies: Iterator[tuple[int, int, Any]] = iter(())
    if timeless is not None:
        copies = ((ts, rid, dec.build(*vals))
                  for ts, rid, vals in Runs(conn, dec).in_time_order(timeless[0], timeless[1], f.since, f.until))
    for _ts, _id, rec in heapq.merge(rows, copies, key=_ts_id):
        yield rec


def _ts_id(t: tuple[int, int, Any]) -> tuple[int, int]:
    return t[0], t[1]


# --- output --------------------------------------------------------------------------------

_json = msgspec.json.Encoder()


def to_json(record: Record) -> bytes:
    """The documented JSON form (one object, no newline)."""
    return _json.encode(record)


def csv_columns() -> list[str]:
    cols = ["kind"]
    for t in RECORD_TYPES:
        for f in t.__struct_fields__:
            if f not in cols:
                cols.append(f)
    return cols


def csv_rows(records: Iterable[Record]) -> Iterator[list[str]]:
    cols = csv_columns()
    for r in records:
        d = msgspec.to_builtins(r)
        yield [_cell(d.get(c)) for c in cols]


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return _json.encode(v).decode()
    return str(v)


def write_csv(records: Iterable[Record], out: io.TextIOBase) -> int:
    w = csv.writer(out)
    w.writerow(csv_columns())
    n = 0
    for row in csv_rows(records):
        w.writerow(row)
        n += 1
    return n


TABLE = (("time", 23), ("kind", 12), ("account", 12), ("client", 21), ("server", 21), ("action", 6), ("what", 0))


def _summary(r: Record) -> str:
    tag = r.__struct_config__.tag  # type: ignore[attr-defined]
    d = msgspec.structs.asdict(r)
    if tag == "http":
        s = f"{d['method'] or ''} {d['host'] or ''}{d['url'] or ''} {d['status'] or ''}"
    elif tag == "tls":
        s = f"sni={d['sni']}"
    elif tag == "dns":
        s = f"{d['qname']} {d['qtype_name'] or d['qtype']} {d['rcode_name'] or ''} {' '.join(d['answers'][:3])}"
    elif tag == "conn":
        s = f"{d['proto']} {d['dns_name'] or ''} up={d['bytes_up']} down={d['bytes_down']}"
    elif tag == "alarm":
        s = f"{d['alarm_kind']}: {d['detail'] or ''}"
    elif tag == "maintenance":
        s = f"{d['admin'] or ''} {d['operation'] or ''} {d['target'] or ''} {d['result'] or ''}"
    elif tag == "session":
        s = f"{d['method'] or ''} phone={d['phone'] or ''} {d['reason'] or ''}"
    else:
        s = f"{d.get('real_name') or ''}"
    if r.rule_ids:
        s += f" rules={','.join(r.rule_ids)}"
    return " ".join(s.split())


def _ep(ip: str | None, port: int | None) -> str:
    if ip is None:
        return "-"
    return f"[{ip}]:{port}" if ":" in ip and port is not None else f"{ip}:{port}" if port is not None else ip


def table_lines(records: Iterable[Record], tz: dt.tzinfo) -> Iterator[str]:
    """Aligned columns with fixed widths (so the first line can be printed before the
    last record is read); local time of the store's zone."""
    def fmt(cells: Sequence[str]) -> str:
        out = []
        for (name, w), c in zip(TABLE, cells):
            out.append(c if not w else (c if len(c) <= w else c[: w - 1] + "…").ljust(w))
        return "  ".join(out).rstrip()

    yield fmt([n for n, _ in TABLE])
    for r in records:
        t = dt.datetime.fromtimestamp(r.ts / US, tz).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        yield fmt([t, r.__struct_config__.tag, r.account or "-", _ep(r.client_ip, r.client_port),  # type: ignore[attr-defined]
                   _ep(r.server_ip, r.server_port), r.action, _summary(r)])


def stream_output(records: Iterable[Record], fmt: str, out, tz: dt.tzinfo) -> int:
    """Write records to the text stream ``out`` as ``table``, ``json`` or ``csv``; count."""
    n = 0
    if fmt == "json":
        for r in records:
            out.write(to_json(r).decode())
            out.write("\n")
            n += 1
        return n
    if fmt == "csv":
        return write_csv(records, out)
    for i, line in enumerate(table_lines(records, tz)):
        out.write(line + "\n")
        n = i
    return n


def default_store() -> Path:
    return Path(os.environ.get("LINEWARDEN_STORE", "var"))
