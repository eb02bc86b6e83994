"""URL rules: host + path-prefix rules of ``urls.tsv`` and their matcher.

Owns the URL rule syntax and request-path canonicalisation; must not do I/O.

A ``url`` column is ``[scheme://]HOST[:port][/path-prefix][?query-prefix]``:

* the scheme is optional and ignored (``http`` and ``https`` alike); the port is ignored;
* HOST follows ``domains.tsv``: ``name`` = the name and its subdomains, ``=name`` exactly
  the name, ``*.name`` strict subdomains only (see rules/domains.py);
* the path prefix is compared case-sensitively (RFC 3986 6.2.2.1: only scheme and
  host are case-insensitive), after percent-decoding (UTF-8; ``%2F`` stays encoded so
  an escaped slash cannot fake a segment) and removing dot segments (RFC 3986 5.2.4)
  on both sides, so ``/论坛`` matches ``/%E8%AE%BA%E5%9D%9B`` and ``/a/../论坛``;
* the prefix ends at a segment boundary: ``/forum`` matches ``/forum``, ``/forum/x`` and
  ``/forum?p=1`` but not ``/forums``; a prefix ending in ``/`` matches everything below;
* no path (or ``/``) matches every path of the host;
* with ``?query``, the request's query must start with it and continue with ``&`` or end;
  without one, the query is ignored. A ``#fragment`` is never sent, so it is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote

from rules.domains import canonical_host, parse_domain_pattern

if TYPE_CHECKING:
    from rules.ruleset import UrlRule

__all__ = ["ParsedUrl", "UrlMatcher", "canonical_path", "parse_url_rule"]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class ParsedUrl(NamedTuple):
    host: str
    """Canonical host name (punycode, lower case)."""
    mode: str
    """How the host matches: ``suffix``, ``exact`` or ``strict-sub`` (as domains.tsv)."""
    path_prefix: str
    """Canonical path prefix, ``""`` for any path."""
    query_prefix: str | None
    """Canonical query prefix, None when the query is not looked at."""


def canonical_path(path: str) -> str:
    """Percent-decoded (except ``%2F``), dot segments removed; ``""`` stays ``""``."""
    if "%" in path:
        path = unquote(path.replace("%2F", "%252F").replace("%2f", "%252F"), errors="surrogateescape")
    if "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


def parse_url_rule(text: str) -> ParsedUrl:
    """Parse one ``url`` column value; raises ValueError with the reason."""
    s = text.strip()
    if not s:
        raise ValueError("empty url")
    if any(c.isspace() for c in s):
        raise ValueError("contains a space (percent-encode it as %20)")
    if "#" in s:
        raise ValueError("contains a '#fragment', which browsers never send")
    m = _SCHEME.match(s)
    if m:
        scheme = m.group()[:-3].lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme {scheme!r} is not http or https")
        s = s[m.end():]
    elif s.startswith("//"):
        s = s[2:]
    cut = min((i for i in (s.find("/"), s.find("?")) if i >= 0), default=len(s))
    host_part, rest = s[:cut], s[cut:]
    if "@" in host_part:
        raise ValueError("contains user information ('user@host')")
    try:
        pattern = parse_domain_pattern(host_part)
    except ValueError as e:
        raise ValueError(f"host {host_part!r}: {e}") from None
    path, _, query = rest.partition("?")
    query_prefix = unquote(query, errors="surrogateescape") if "?" in rest else None
    path = canonical_path(path)
    if path == "/":
        path = ""
    return ParsedUrl(pattern.name, pattern.mode, path, query_prefix)


def _split_target(path: str) -> tuple[str, str | None]:
    """(path, query) of a request-target in origin or absolute form."""
    m = _SCHEME.match(path)
    if m:
        rest = path[m.end():]
        slash = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
        path = rest[min(slash):] if slash else "/"
    path = path.split("#", 1)[0]
    p, sep, q = path.partition("?")
    return p, (q if sep else None)


def _path_matches(prefix: str, path: str) -> bool:
    if not prefix:
        return True
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


def _query_matches(prefix: str | None, query: str | None) -> bool:
    if prefix is None:
        return True
    if query is None:
        return prefix == ""
    if not query.startswith(prefix):
        return False
    return len(query) == len(prefix) or query[len(prefix)] == "&" or prefix.endswith("&")


class UrlMatcher:
    """Compiled URL rules: host tables as in DomainMatcher, then prefix checks."""

    __slots__ = ("rules", "_exact", "_suffix", "_strict")

    def __init__(self, rules: list[UrlRule]) -> None:
        self.rules = rules
        self._exact: dict[str, list[int]] = {}
        self._suffix: dict[str, list[int]] = {}
        self._strict: dict[str, list[int]] = {}
        tables = {"exact": self._exact, "suffix": self._suffix, "strict-sub": self._strict}
        for i, rule in enumerate(rules):
            tables[rule.mode].setdefault(rule.host, []).append(i)

    @classmethod
    def compile(cls, rules: Iterable[UrlRule]) -> UrlMatcher:
        return cls(list(rules))

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, host: str, path: str) -> list[UrlRule]:
        """Rules whose host matches ``host`` and whose prefix matches ``path``.

        ``path`` is the request-target as sent (origin form ``/p?q`` or absolute form).
        """
        h = canonical_host(host)
        if h is None or not self.rules:
            return []
        candidates: list[int] = list(self._exact.get(h, ()))
        name = h
        while True:
            candidates.extend(self._suffix.get(name, ()))
            if name is not h:
                candidates.extend(self._strict.get(name, ()))
            dot = name.find(".")
            if dot < 0:
                break
            name = name[dot + 1:]
        if not candidates:
            return []
        raw_path, query = _split_target(path)
        cpath = canonical_path(raw_path)
        cquery = unquote(query, errors="surrogateescape") if query else query
        out = []
        for i in candidates:
            rule = self.rules[i]
            if _path_matches(rule.path_prefix, cpath) and _query_matches(rule.query_prefix, cquery):
                out.append(rule)
        return out
