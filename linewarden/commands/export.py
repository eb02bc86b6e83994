"""``linewarden export``: records for an investigator (JSON lines, CSV) or a SIEM (syslog)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from linewarden.commands.query import add_filters

    p = sub.add_parser("export", help="export records as JSON lines or CSV, or forward them as RFC 5424 syslog")
    add_filters(p)
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--out", help="write to this file (default: standard output)")
    p.add_argument("--syslog", metavar="URL", help="also send each record to udp://HOST[:PORT] or tcp://HOST[:PORT]")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys
    from contextlib import nullcontext
    from pathlib import Path

    from linewarden.commands.query import run_query
    from storage.export import SyslogSender, export
    from storage.query import QueryError

    if not Path(args.store).is_dir():
        print(f"linewarden export: no store at {args.store}", file=sys.stderr)
        return 1
    sender = None
    if args.syslog:
        try:
            sender = SyslogSender(args.syslog)
        except ValueError as exc:
            print(f"linewarden export: --syslog {args.syslog!r}: {exc}", file=sys.stderr)
            return 2
    try:
        records = run_query(args, None)
        if sender is not None:
            records = _tee(records, sender)
        with (open(args.out, "w", newline="", encoding="utf-8") if args.out else nullcontext(sys.stdout)) as out:
            n = export(records, out, args.format)
    except QueryError as exc:
        print(f"linewarden export: {exc}", file=sys.stderr)
        return 2
    finally:
        if sender is not None:
            sender.close()
    msg = f"exported {n} records"
    if sender is not None:
        msg += f"; syslog: {sender.sent} sent, {sender.failed} failed"
    print(msg, file=sys.stderr)
    return 1 if sender is not None and sender.failed else 0


def _tee(records, sender):
    for r in records:
        sender.send(r)
        yield r
