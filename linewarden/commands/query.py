"""``linewarden query``: records of the audit store, filtered, in time order."""

from __future__ import annotations

import argparse
import os

STORE_HELP = "store directory (default $LINEWARDEN_STORE or ./var)"


def add_filters(p: argparse.ArgumentParser) -> None:
    """The filter options shared by ``query`` and ``export``."""
    p.add_argument("--store", default=os.environ.get("LINEWARDEN_STORE", "var"), help=STORE_HELP)
    p.add_argument("--since", help="from this time on: 2026-11-28, 2026-11-28T10:00[+08:00], 7d, 24h (store time zone unless an offset is given)")
    p.add_argument("--until", help="before this time (exclusive), same forms as --since")
    p.add_argument("--account", help="the user's account (exact)")
    p.add_argument("--ip", help="client, NAT or server address, or a network (10.1.0.0/16)")
    p.add_argument("--domain", help="host, SNI, DNS qname or resolved name: the name and its subdomains")
    p.add_argument("--action", choices=("allow", "block", "log"))
    p.add_argument("--kind", action="append", help="record kind (conn, http, tls, dns, session, registration, maintenance, alarm); repeat or comma-separate")


def run_query(args: argparse.Namespace, limit: int | None):
    """The record iterator for parsed filter options (raises QueryError on bad input)."""
    import time

    from storage.partitions import store_tz
    from storage.query import parse_time, query

    tz = store_tz(args.store)
    now = time.time()
    kinds = [k.strip() for ks in (args.kind or []) for k in ks.split(",") if k.strip()]
    return query(
        args.store,
        since=parse_time(args.since, tz, now) if args.since else None,
        until=parse_time(args.until, tz, now) if args.until else None,
        account=args.account, ip=args.ip, domain=args.domain, action=args.action,
        kind=kinds or None, limit=limit,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="show records of the audit store",
                       description="Records in time order across day files. JSON: one record a line, ts in µs since the epoch (UTC).")
    add_filters(p)
    p.add_argument("--limit", type=int, help="at most this many records")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", dest="fmt", action="store_const", const="json", help="one JSON object a line")
    out.add_argument("--csv", dest="fmt", action="store_const", const="csv", help="CSV with a header row")
    out.add_argument("--table", dest="fmt", action="store_const", const="table", help="aligned columns (default on a terminal)")
    p.set_defaults(func=_run, fmt=None)


def _run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from storage.partitions import store_tz
    from storage.query import QueryError, stream_output

    if not Path(args.store).is_dir():
        print(f"linewarden query: no store at {args.store}", file=sys.stderr)
        return 1
    fmt = args.fmt or ("table" if sys.stdout.isatty() else "json")
    try:
        records = run_query(args, args.limit)
        stream_output(records, fmt, sys.stdout, store_tz(args.store))
    except QueryError as exc:
        print(f"linewarden query: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    return 0
