"""`linewarden rules ...`: the rule maintainer's commands.

A command group: each subcommand is one ``_register_X(sub)`` function plus one
``run_X(args) -> int``, listed in ``SUBCOMMANDS``; later issues add ``import``,
``pack``, ``verify``, ``push`` and ``rollback`` the same way.

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
                         ("urls.tsv", rs.urls)):
        counts = Counter(r.category for r in rules)
        per_cat = ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
        print(f"  {fname}: {len(rules)} rules" + (f" ({per_cat})" if per_cat else ""))
    actions = ", ".join(f"{c}={cat.action}" for c, cat in sorted(rs.categories.items()))
    print(f"  categories: {actions}")
    return EXIT_OK


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [  # type: ignore[type-arg]
    _register_check,
]
"""One registration function per `rules` subcommand."""
