"""``linewarden backup run|verify|restore``: closed days copied with a SHA-256 manifest."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    store_default = os.environ.get("LINEWARDEN_STORE", "var")
    p = sub.add_parser("backup", help="back up closed days of the audit store, check or restore a backup")
    bs = p.add_subparsers(dest="backup_command", metavar="ACTION", required=True)
    run = bs.add_parser("run", help="copy every closed day not yet in the backup, update the manifest")
    run.add_argument("--store", default=store_default)
    run.add_argument("--to", required=True, help="backup directory (another disk or a mounted share)")
    run.set_defaults(func=_run)
    ver = bs.add_parser("verify", help="check every backed-up file against the manifest")
    ver.add_argument("--backup", required=True)
    ver.add_argument("--deep", action="store_true", help="also re-check the hash chains and signatures")
    ver.set_defaults(func=_verify)
    res = bs.add_parser("restore", help="copy days from a backup into a store")
    res.add_argument("--backup", required=True)
    res.add_argument("--store", default=store_default)
    res.add_argument("--day", action="append", help="only this day (YYYY-MM-DD); repeatable; default all")
    res.add_argument("--force", action="store_true", help="replace a differing day file (the old one is kept aside)")
    res.set_defaults(func=_restore)


def _print(rep, verb: str) -> int:
    for p in rep.problems:
        print(f"FAIL {p}")
    print(("OK" if rep.ok else "FAILED") + f": {len(rep.copied)} {verb}, {len(rep.skipped)} unchanged, {len(rep.problems)} problem(s)")
    return 0 if rep.ok else 1


def _run(args: argparse.Namespace) -> int:
    from storage.backup import backup_run

    rep = backup_run(args.store, args.to)
    for d in rep.copied:
        print(f"copied {d}")
    return _print(rep, "copied")


def _verify(args: argparse.Namespace) -> int:
    from storage.backup import backup_verify

    rep = backup_verify(args.backup, deep=args.deep)
    for p in rep.problems:
        print(f"FAIL {p}")
    print(("OK" if rep.ok else "FAILED") + f": {len(rep.skipped)} file(s) match the manifest, {len(rep.problems)} problem(s)")
    return 0 if rep.ok else 1


def _restore(args: argparse.Namespace) -> int:
    from storage.backup import backup_restore

    rep = backup_restore(args.backup, args.store, days=args.day, force=args.force)
    for d in rep.copied:
        print(f"restored {d}")
    return _print(rep, "restored")
