"""`linewarden rules ...`: the rule maintainer's commands.

A command group: each subcommand is one ``_register_X(sub)`` function plus one
``run_X(args) -> int``, listed in ``SUBCOMMANDS``: ``check``, ``import``, ``pack``,
``verify``, ``push`` and ``rollback`` (README.md, "Rule distribution").

``rules check DIR`` prints every problem of the rule set as ``FILE:LINE:COL: reason``
(LINE and COL left out when they do not apply) and exits 2, the status ``scan`` and
``run`` use for a rule-set error, so scripts see one meaning for 2 ("your input is
wrong: fix it"); a valid rule set prints a summary and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

EXIT_OK = 0
EXIT_INVALID = 2
"""A rule-set error, as for `linewarden scan` (and argparse's usage errors)."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "rules",
        help="check and manage rule sets",
        description="Rule-set tools for maintainers.",
    )
    group = p.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(group)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return EXIT_INVALID


# ------------------------------------------------------------------------- check


def _register_check(group: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = group.add_parser(
        "check",
        help="validate a rule-set directory and print every problem",
        description="Validate a rule-set directory: print every problem as FILE:LINE:COL: "
        "reason and exit 2, or a summary and exit 0.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="rule-set directory (holds ruleset.toml)")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from rules.errors import RuleProblem
    from rules.ruleset import check_ruleset, load_ruleset

    problems = check_ruleset(args.dir)
    if problems:
        for problem in problems:
            # Problems name files relative to the rule set; print paths a shell or an
            # editor can open (FILE:LINE:COL).
            file = problem.file if problem.file == str(args.dir) else str(args.dir / problem.file)
            print(RuleProblem(file, problem.line, problem.reason, problem.column))
        print(f"{len(problems)} problem(s); the rule set would not be loaded", file=sys.stderr)
        return EXIT_INVALID
    rs = load_ruleset(args.dir)
    print(f"{rs.name} version {rs.version}: valid")
    for fname, rules in (("keywords.tsv", rs.keywords), ("domains.tsv", rs.domains),
                         ("urls.tsv", rs.urls), ("phrases.tsv", rs.phrases)):
        counts = Counter(r.category for r in rules)
        per_cat = ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
        print(f"  {fname}: {len(rules)} rules" + (f" ({per_cat})" if per_cat else ""))
    actions = ", ".join(f"{c}={cat.action}" for c, cat in sorted(rs.categories.items()))
    print(f"  categories: {actions}")
    return EXIT_OK


# ------------------------------------------------------------------------ import


def _register_import(group: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = group.add_parser(
        "import",
        help="convert hosts/domain/AdBlock/e2guardian lists into a rule-set directory",
        description="Convert block lists into rules of CATEGORY and merge them into DIR "
        "(created when missing; rules from other sources are kept). Prints what was taken "
        "and skipped, and why. See the README, Rule distribution.",
    )
    p.add_argument("--format", required=True, choices=("hosts", "domains", "adblock", "e2guardian"))
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--category", required=True, help="category of the imported rules")
    p.add_argument("--into", required=True, type=Path, metavar="DIR", help="rule-set directory")
    p.add_argument("--threshold", type=int, help="e2guardian: the category's weighted-phrase "
                   "threshold (default: kept, or 50 when the category has none)")
    p.add_argument("--action", choices=("block", "log"), default="block",
                   help="action of a category created by the import (default block)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every skipped line")
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from rules.importers import import_lists
    from rules.ruleset import check_ruleset

    for f in args.files:
        if not f.is_file():
            print(f"linewarden rules import: {f}: no such file", file=sys.stderr)
            return EXIT_INVALID
    try:
        report = import_lists(args.format, args.files, args.category, args.into,
                              threshold=args.threshold, action=args.action)
    except (ValueError, OSError) as e:
        print(f"linewarden rules import: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(report.summary())
    shown = report.skipped if args.verbose else report.skipped[:20]
    for file, line, reason in shown:
        print(f"  {file}:{line}: {reason}")
    if len(shown) < len(report.skipped):
        print(f"  ... {len(report.skipped) - len(shown)} more (-v lists them all)")
    problems = check_ruleset(args.into)
    for problem in problems:
        print(f"{args.into}/{problem}")
    return EXIT_INVALID if problems else EXIT_OK


# ------------------------------------------------------------------ pack / verify


def _register_pack(group: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = group.add_parser(
        "pack",
        help="write a signed bundle of a rule-set directory",
        description="Validate DIR and write one bundle file: its rule files, a manifest (name, "
        "version, SHA-256 of every file, creation time) and an Ed25519 signature.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--key", required=True, type=Path, metavar="KEY",
                   help="key directory of `linewarden keys init` (or its signing.key)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE")
    p.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from linewarden import keys
    from rules.bundle import BundleError, pack

    key_dir = args.key.parent if args.key.is_file() else args.key
    try:
        pair = keys.load(key_dir)
        manifest = pack(args.dir, args.output, pair, now=datetime.now(timezone.utc))
    except (keys.KeyProblem, BundleError) as e:
        print(f"linewarden rules pack: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.output}: {manifest['name']} version {manifest['version']}, "
          f"{len(manifest['files'])} files, signed by {pair.fingerprint}")
    return EXIT_OK


def _register_verify(group: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = group.add_parser(
        "verify",
        help="check a bundle's signature, hashes and rule set",
        description="Run the appliance's acceptance checks on a bundle (except the version "
        "check, unless --running-version is given).",
    )
    p.add_argument("bundle", type=Path, metavar="FILE")
    p.add_argument("--pubkey", required=True, action="append", type=Path, metavar="PUB",
                   help="trusted public key (PEM or key directory); repeatable")
    p.add_argument("--running-version", type=int, help="refuse versions not above this")
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    import tempfile

    from linewarden import keys
    from rules.bundle import BundleError, verify_bundle

    try:
        pubs = [keys.load_public(p) for p in args.pubkey]
    except (keys.KeyProblem, ValueError) as e:
        print(f"linewarden rules verify: {e}", file=sys.stderr)
        return EXIT_INVALID
    with tempfile.TemporaryDirectory() as tmp:
        try:
            b = verify_bundle(args.bundle, pubs, Path(tmp) / "b", running_version=args.running_version)
        except BundleError as e:
            for reason in e.reasons:
                print(f"{args.bundle}: {reason}", file=sys.stderr)
            return EXIT_INVALID
    print(f"{args.bundle}: OK: {b.name} version {b.version}, created {b.created}, signed by {b.key}")
    return EXIT_OK


# ----------------------------------------------------------------- push / rollback


def _add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", help="control socket (default: from --config, "
                   "else ./var/control.sock)")
    p.add_argument("--config", metavar="FILE", help="the appliance's config file")


def _socket_path(args: argparse.Namespace) -> Path:
    from linewarden.config import load_config
    from linewarden.reload import control_path

    return Path(args.socket) if args.socket else control_path(load_config(args.config))


def _register_push(group: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = group.add_parser(
        "push",
        help="hand a signed bundle to the running appliance (hot reload)",
        description="Send FILE to `linewarden run` over its control socket; it is verified, "
        "compiled off the data path and swapped in without a restart. Exit 0 when active, "
        "2 when refused (the running rules stay).",
    )
    p.add_argument("bundle", type=Path, metavar="FILE")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept a version not above the running one (recorded)")
    _add_socket(p)
    p.set_defaults(func=run_push)


def _register_rollback(group: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = group.add_parser(
        "rollback",
        help="re-activate the previous rule set on the running appliance",
        description="Swap back to the rule set that was active before the last push or reload.",
    )
    _add_socket(p)
    p.set_defaults(func=run_rollback)


def run_push(args: argparse.Namespace) -> int:
    try:
        data = args.bundle.read_bytes()
    except OSError as e:
        print(f"linewarden rules push: {e}", file=sys.stderr)
        return EXIT_INVALID
    return _talk(args, "push", data, allow_downgrade=args.allow_downgrade)


def run_rollback(args: argparse.Namespace) -> int:
    return _talk(args, "rollback")


def _talk(args: argparse.Namespace, op: str, payload: bytes = b"", **kw: object) -> int:
    from linewarden.control import request

    path = _socket_path(args)
    try:
        answer = request(path, op, payload, **kw)
    except OSError as e:
        print(f"linewarden rules {op}: {path}: {e} (is `linewarden run` running, and may you "
              f"use its control socket?)", file=sys.stderr)
        return 1
    if answer.get("ok"):
        print(f"{op}: ok: {answer.get('message')}")
        return EXIT_OK
    print(f"{op}: refused: {answer.get('message', '')}", file=sys.stderr)
    for err in answer.get("errors", []):
        print(f"  {err}", file=sys.stderr)
    return EXIT_INVALID


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [  # type: ignore[type-arg]
    _register_check,
    _register_import,
    _register_pack,
    _register_verify,
    _register_push,
    _register_rollback,
]
"""One registration function per `rules` subcommand."""
