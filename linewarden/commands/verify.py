"""``linewarden verify``: check the audit store's hash chains and signatures."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check that no record was changed, deleted or inserted",
                       description="Exit 0 when every day file matches its hash chain and signed digests; "
                                   "otherwise 1, naming each day and batch that does not.")
    p.add_argument("--store", default=os.environ.get("LINEWARDEN_STORE", "var"), help="store directory (default $LINEWARDEN_STORE or ./var)")
    p.add_argument("--day", action="append", help="only this day (YYYY-MM-DD); repeatable")
    p.add_argument("--pubkey", help="public key (PEM file or key directory) to check signatures with (default <store>/keys)")
    p.add_argument("-q", "--quiet", action="store_true", help="print problems and the summary only")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from storage.verify import iter_report_lines, verify_store

    if not Path(args.store).is_dir():
        print(f"linewarden verify: no store at {args.store}", file=sys.stderr)
        return 2
    report = verify_store(args.store, days=args.day, public_key=args.pubkey)
    for line in iter_report_lines(report):
        if args.quiet and line.startswith("note"):
            continue
        print(line)
    return 0 if report.ok else 1
