"""Typed errors of the rules package, saying whose fault they are (STYLE.md 4).

* ``RuleSetError``: the rule maintainer's: names the file, line, column and reason.
* ``InputError``: the traffic's: names the decoder and the byte offset.

Adapters catch ``LinewardenError`` once at their edge (STYLE.md 5).
"""

from __future__ import annotations

from dataclasses import dataclass


class LinewardenError(Exception):
    """Base of every error linewarden raises on purpose."""


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One problem in one rule file."""

    file: str
    line: int
    """1-based; 0 when the problem concerns the whole file."""
    reason: str
    column: int = 0
    """1-based column (field number for TSV files); 0 when not applicable."""

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        return f"{where}: {self.reason}"


class RuleSetError(LinewardenError):
    """A rule set failed validation; it carries every problem found, not just the first."""

    def __init__(self, problems: list[RuleProblem]) -> None:
        self.problems = problems
        head = str(problems[0]) if problems else "invalid rule set"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(head + more)


class InputError(LinewardenError):
    """Traffic that could not be decoded as it claims to be."""

    def __init__(self, decoder: str, reason: str, offset: int | None = None) -> None:
        self.decoder = decoder
        self.reason = reason
        self.offset = offset
        at = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{decoder}: {reason}{at}")
