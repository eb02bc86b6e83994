"""The ``linewarden`` command: discovers the command modules and dispatches."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from linewarden import __version__, commands

EXIT_USAGE = 2
"""Exit status for usage and rule-set errors, as argparse uses."""


def load_engine(rules_dir: Path | None, backend: str, prog: str) -> Any | None:
    """Compile the rule set for a command, or print every problem and return None.

    ``rules_dir`` None means the bundled sample rules. The caller exits with
    ``EXIT_USAGE`` on None, as every command does for a bad rule set.
    """
    from rules.engine import SAMPLE_RULES, Engine
    from rules.errors import RuleSetError

    try:
        return Engine.from_dir(rules_dir or SAMPLE_RULES, backend=backend)
    except RuleSetError as exc:
        for problem in exc.problems:
            print(f"{prog}: {problem}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"{prog}: cannot load rule set: {exc}", file=sys.stderr)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linewarden",
        description="Filtering and audit for an organisation's internet egress.",
    )
    parser.add_argument("--version", action="version", version=f"linewarden {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `linewarden query ... | head`: the reader left; not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
