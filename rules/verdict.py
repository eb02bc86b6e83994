"""The Engine's answers: ``Match`` and ``Verdict``.

Both are small frozen dataclasses (STYLE.md 9): validated when built, safe to
share between threads and connections, and compared by value in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["allow", "block", "log"]
"""``block``: stop the flow and record it; ``log``: let it pass and record the
match; ``allow``: nothing matched (the flow is still recorded by the adapter)."""

ACTIONS: tuple[Action, ...] = ("allow", "log", "block")
"""Ordered by severity: the verdict of several matches is the most severe action."""

RuleKind = Literal["keyword", "domain", "url", "phrase"]

SNIPPET_CHARS = 24
"""Characters of context kept on each side of a keyword match. Enough for an
auditor to see the sentence, short enough that evidence stays small."""


@dataclass(frozen=True, slots=True)
class Match:
    """One rule that fired."""

    rule_id: str
    """The rule's ``id`` column, unique within the rule set."""
    category: str
    """The rule's category (a table of ``ruleset.toml``)."""
    kind: RuleKind
    """Which rule file it came from."""
    pattern: str
    """The keyword, domain pattern or URL rule as the maintainer wrote it."""
    action: Action
    """The rule's effective action (its own ``action`` column, else its category's)."""
    where: str
    """Where it was found: ``host``, ``path``, ``query``, ``body``, ``form:<field>``,
    ``json``, ``multipart:<name>``, ``sni``, ``qname``, ``cname``, ``url``, ``text``."""
    snippet: str = ""
    """Normalised text around the match (at most ``SNIPPET_CHARS`` each side)."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the Engine decided about one message, query or handshake."""

    action: Action
    """The most severe action of ``matches``; ``allow`` when there are none."""
    matches: tuple[Match, ...] = ()
    """Every rule that fired, in the order found, each rule id at most once."""
    ruleset_version: int = 0
    """``version`` of the rule set that decided (every record carries it)."""
    truncated: bool = False
    """True when scanning stopped at a configured cap (decompressed size, body
    size): the part past the cap was not looked at."""
    errors: tuple[str, ...] = ()
    """Decoding problems met on the way (``gzip: bad CRC at byte 1234``); the
    text decoded before the problem was still scanned."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}")

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(m.rule_id for m in self.matches)


def combine_action(matches: tuple[Match, ...] | list[Match]) -> Action:
    """The most severe action among ``matches`` (``allow`` for none)."""
    best = 0
    for m in matches:
        best = max(best, ACTIONS.index(m.action))
    return ACTIONS[best]
