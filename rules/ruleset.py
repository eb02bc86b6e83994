"""Rule sets: reading and validating a rule-set directory.

Owns the on-disk format of a rule set and its validation; must not compile matchers
(rules/matcher.py, domains.py, urls.py do) or touch anything but the files of the
directory it is given. This is the only module of rules/ that reads files, and it is
not on the data path: the Engine is compiled from the ``RuleSet`` it returns.

A rule set is a directory; every file but ``ruleset.toml`` is optional::

    ruleset.toml   name = "..."; version = 7;  [categories.gambling] action = "block"
    keywords.tsv   id  category  keyword  [action]  [flags]
    domains.tsv    id  category  domain   [action]
    urls.tsv       id  category  url      [action]
    phrases.tsv    id  category  phrase   [weight]  [action]

TSV files are UTF-8 (a BOM is accepted), LF or CRLF, tab-separated. The first line
that is neither blank nor a ``#`` comment is the header naming the columns; columns
are found by name, in any order. Every other line is one rule with exactly as many
fields as the header. ``action`` (``block`` or ``log``) overrides the category's;
empty means the category's.

Keyword ``flags`` (comma-separated; empty = none):

* ``exact`` – the keyword is compiled as written instead of being normalised
  (rules/normalize.py). Scanned text is always normalised, so an exact keyword must
  already be in normalised form; validation refuses one that is not, showing the
  normalised form, so the flag never yields a rule that cannot match. Use it to pin a
  keyword whose folding you want reported rather than applied silently.

Phrases (``phrases.tsv``, e2guardian's phrase lists; rules/importers.py converts them):

* ``phrase`` is one or more *parts* separated by ``,`` (a part cannot contain an ASCII
  comma; each part is normalised like a keyword). A phrase *is found* in a message
  when every one of its parts appears anywhere in it (any order, any run: the target
  and body of one HTTP message, or one ``scan_text``). One part = a plain phrase.
* ``weight`` empty: a banned phrase or combination; it fires when found.
* ``weight`` an integer (may be negative, e2guardian's "good" phrases): the category
  needs ``threshold = N`` in ruleset.toml; the weights of the *distinct* phrases
  found in a message are summed per category and, once the sum reaches the threshold,
  every found phrase of that category with a positive weight fires.

Validation collects every problem (``RuleProblem(file, line, reason, column)``, column =
the 1-based field number) and ``load_ruleset`` raises ``RuleSetError`` with all of
them: a rule set with any problem is never loaded, not even in part.
"""

from __future__ import annotations

import io
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rules.domains import parse_domain_pattern
from rules.errors import RuleProblem, RuleSetError
from rules.normalize import normalize, normalize_many
from rules.urls import parse_url_rule

__all__ = [
    "Category",
    "DomainRule",
    "KeywordRule",
    "KEYWORD_FLAGS",
    "MAX_KEYWORD_CHARS",
    "PhraseRule",
    "RuleSet",
    "UrlRule",
    "check_ruleset",
    "load_ruleset",
]

RuleAction = Literal["block", "log"]
RULE_ACTIONS: tuple[str, ...] = ("block", "log")

MAX_KEYWORD_CHARS = 256
"""Longest keyword. A keyword is a phrase, not a document; every streamed text run
keeps (longest keyword - 1) characters of overlap per scan window, and the corpus's
longest keyword is 33 characters. Longer lines are almost always a paste error."""

MAX_ID_CHARS = 128
"""Longest rule id; ids are written into every record that a rule decides."""

MAX_PROBLEMS_PER_FILE = 1000
"""Problems reported per file before the rest are only counted: a binary or
wrong-format file would otherwise produce one problem per line."""

MAX_FILE_BYTES = 512 * 1024 * 1024
"""Largest rule file read (1M keywords take about 40 MB); a bigger one is refused
before it is read, so a wrong path cannot exhaust memory."""

MAX_PHRASE_PARTS = 16
"""Parts of one phrase (e2guardian's combinations have 2-5); more is a paste error."""

MAX_WEIGHT = 1_000_000
"""Largest absolute phrase weight and threshold (e2guardian's lists use up to a few hundred)."""

KEYWORD_FLAGS = frozenset({"exact"})
"""Known values of the keyword ``flags`` column (see the module docstring)."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]*\Z")
_CATEGORY = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")


@dataclass(frozen=True, slots=True)
class Category:
    action: RuleAction
    """``block``: stop and record; ``log``: record only."""
    description: str = ""
    name: str = ""
    """The table name in ruleset.toml (``gambling``)."""
    threshold: int | None = None
    """Weighted phrases of the category block (or log) once the sum of the weights
    of the distinct phrases found in a message reaches this; None: no weighted phrases."""


@dataclass(frozen=True, slots=True)
class KeywordRule:
    id: str
    category: str
    keyword: str
    """As the maintainer wrote it (shown in matches and records)."""
    action: RuleAction
    """Effective action: the rule's own, else its category's."""
    flags: frozenset[str] = frozenset()
    normalized: str = ""
    """What is matched: ``normalize(keyword)``, or ``keyword`` with flag ``exact``.
    Empty when the rule was built by hand; the matcher then computes it."""


@dataclass(frozen=True, slots=True)
class DomainRule:
    id: str
    category: str
    pattern: str
    """As written in ``domains.tsv`` (e.g. ``=Casino.example.``)."""
    action: RuleAction
    mode: Literal["suffix", "exact", "strict-sub"]
    name: str = ""
    """Canonical ASCII name without prefix (``casino.example``)."""


@dataclass(frozen=True, slots=True)
class UrlRule:
    id: str
    category: str
    url: str
    """As written in ``urls.tsv``."""
    action: RuleAction
    host: str
    """Canonical ASCII host name."""
    path_prefix: str
    """Canonical path prefix (see rules/urls.py); ``""`` matches every path."""
    mode: Literal["suffix", "exact", "strict-sub"] = "suffix"
    query_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class PhraseRule:
    id: str
    category: str
    phrase: str
    """As written in ``phrases.tsv`` (``poker,casino``)."""
    action: RuleAction
    parts: tuple[str, ...]
    """Normalised parts; the phrase is found when all of them are."""
    weight: int | None = None
    """None: fires alone; else counts towards the category's threshold."""


@dataclass(frozen=True, slots=True)
class RuleSet:
    name: str
    version: int
    categories: dict[str, Category]
    keywords: list[KeywordRule] = field(default_factory=list)
    domains: list[DomainRule] = field(default_factory=list)
    urls: list[UrlRule] = field(default_factory=list)
    phrases: list[PhraseRule] = field(default_factory=list)


# --------------------------------------------------------------------------- parsing


class _Problems:
    """Problems of one rule set, capped per file."""

    def __init__(self) -> None:
        self.items: list[RuleProblem] = []
        self._per_file: dict[str, int] = {}

    def add(self, file: str, line: int, reason: str, column: int = 0) -> None:
        n = self._per_file.get(file, 0) + 1
        self._per_file[file] = n
        if n <= MAX_PROBLEMS_PER_FILE:
            self.items.append(RuleProblem(file, line, reason, column))

    def sort(self) -> None:
        """Order by (file order, line, column): the keyword pass reports in two rounds."""
        order: dict[str, int] = {}
        for p in self.items:
            order.setdefault(p.file, len(order))
        self.items.sort(key=lambda p: (order[p.file], p.line, p.column))

    def finish(self) -> list[RuleProblem]:
        for file, n in self._per_file.items():
            if n > MAX_PROBLEMS_PER_FILE:
                self.items.append(
                    RuleProblem(file, 0, f"{n - MAX_PROBLEMS_PER_FILE} more problems not shown "
                                         f"(at most {MAX_PROBLEMS_PER_FILE} per file)")
                )
        return self.items


def _load_toml(path: Path, probs: _Problems) -> tuple[str, int, dict[str, Category]] | None:
    fname = "ruleset.toml"
    if not path.is_file():
        probs.add(fname, 0, "missing: a rule set needs ruleset.toml (name, version, categories)")
        return None
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        probs.add(fname, 0, f"not UTF-8 (byte {e.start})")
        return None
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        line, col = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        probs.add(fname, line, f"invalid TOML: {str(e).split(' (at line')[0]}", col)
        return None
    ok = True
    for key in sorted(set(data) - {"name", "version", "categories", "description"}):
        probs.add(fname, 0, f"unknown key {key!r} (known: name, version, description, categories)")
        ok = False
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        probs.add(fname, 0, "'name' must be a non-empty string")
        ok = False
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        probs.add(fname, 0, "'version' must be a non-negative integer (it only grows)")
        ok = False
    cats_raw = data.get("categories")
    cats: dict[str, Category] = {}
    if not isinstance(cats_raw, dict) or not cats_raw:
        probs.add(fname, 0, "needs at least one [categories.NAME] table with action = \"block\" or \"log\"")
        return None
    for cname, table in cats_raw.items():
        where = f"[categories.{cname}]"
        if not _CATEGORY.match(cname):
            probs.add(fname, 0, f"{where}: category names are lower-case letters, digits, '_' and '-'")
            ok = False
            continue
        if not isinstance(table, dict):
            probs.add(fname, 0, f"{where}: must be a table with an 'action'")
            ok = False
            continue
        for key in sorted(set(table) - {"action", "description", "threshold"}):
            probs.add(fname, 0, f"{where}: unknown key {key!r} (known: action, description, threshold)")
            ok = False
        threshold = table.get("threshold")
        if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool)
                                      or not 0 < threshold <= MAX_WEIGHT):
            probs.add(fname, 0, f"{where}: threshold must be an integer 1-{MAX_WEIGHT}, not {threshold!r}")
            ok = False
            threshold = None
        action = table.get("action")
        if action not in RULE_ACTIONS:
            probs.add(fname, 0, f"{where}: action must be \"block\" or \"log\", not {action!r}")
            ok = False
            continue
        desc = table.get("description", "")
        cats[cname] = Category(action, desc if isinstance(desc, str) else "", cname, threshold)
    if not ok:
        return None
    assert isinstance(name, str) and isinstance(version, int)
    return name.strip(), version, cats


def _read_lines(path: Path, fname: str, probs: _Problems) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for every line; text None when the line is not UTF-8
    (the problem is already recorded)."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        probs.add(fname, 0, f"file is {size} bytes; at most {MAX_FILE_BYTES} are read")
        return
    data = path.read_bytes()
    # Lines one at a time (not data.split(), which would hold 1M line objects at once).
    for lineno, raw in enumerate(io.BytesIO(data), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            column = raw.count(b"\t", 0, e.start) + 1
            probs.add(fname, lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})", column)
            yield lineno, None


class _Table:
    """A parsed TSV file: header → column index, and its rows."""

    def __init__(self, fname: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
        self.fname = fname
        self.required = required
        self.optional = optional
        self.columns: dict[str, int] = {}

    def rows(self, path: Path, probs: _Problems) -> Iterator[tuple[int, list[str]]]:
        header_seen = False
        for lineno, text in _read_lines(path, self.fname, probs):
            if text is None:
                if not header_seen:
                    probs.add(self.fname, lineno, "the header line is not UTF-8: is this a text file?")
                    return
                continue
            # Blank: nothing but spaces. A line of tabs is a row of empty fields.
            if not text.strip(" ") or text.lstrip(" ").startswith("#"):
                continue
            fields = text.split("\t")
            if not header_seen:
                header_seen = True
                if not self._header(fields, lineno, probs):
                    return
                continue
            row = self._row(fields, lineno, probs)
            if row is not None:
                yield lineno, row
        if not header_seen:
            probs.add(self.fname, 0, f"no header line: the first line must name the columns "
                                     f"({', '.join(self.required)})")

    def _header(self, fields: list[str], lineno: int, probs: _Problems) -> bool:
        ok = True
        known = self.required + self.optional
        for i, name in enumerate(fields, start=1):
            name = name.strip()
            if name in self.columns:
                probs.add(self.fname, lineno, f"column {name!r} appears twice in the header", i)
                ok = False
            elif name not in known:
                hint = " (keywords are literal; regular expressions are not supported)" if name == "type" else ""
                probs.add(self.fname, lineno, f"unknown column {name!r} (known: {', '.join(known)}){hint}", i)
                ok = False
            self.columns[name] = i - 1
        for name in self.required:
            if name not in self.columns:
                probs.add(self.fname, lineno, f"the header has no {name!r} column (required: {', '.join(self.required)})")
                ok = False
        return ok

    def _row(self, fields: list[str], lineno: int, probs: _Problems) -> list[str] | None:
        if len(fields) != len(self.columns):
            names = ", ".join(sorted(self.columns, key=self.columns.__getitem__))
            probs.add(self.fname, lineno, f"{len(fields)} columns, expected {len(self.columns)} ({names})")
            return None
        for i, f in enumerate(fields, start=1):
            if "\x00" in f:
                probs.add(self.fname, lineno, "NUL byte", i)
                return None
        return fields

    def index(self, name: str) -> int | None:
        """Field index of column ``name``; None when the header lacks it."""
        return self.columns.get(name)


def _common(
    table: _Table, row: list[str], lineno: int, cats: dict[str, Category],
    ids: dict[str, str], probs: _Problems,
) -> tuple[str, str, RuleAction] | None:
    """Check id, category and action of a row; (id, category, action) or None."""
    ok = True
    col = table.columns
    rid = row[col["id"]].strip()
    if not rid:
        probs.add(table.fname, lineno, "empty id", col["id"] + 1)
        ok = False
    elif rid in ids:
        probs.add(table.fname, lineno, f"duplicate id {rid!r} (first at {ids[rid]})", col["id"] + 1)
        ok = False
    elif len(rid) > MAX_ID_CHARS or not _ID.match(rid):
        probs.add(table.fname, lineno, f"invalid id {rid[:40]!r}: letters, digits and _ . : @ / - "
                                       f"(at most {MAX_ID_CHARS})", col["id"] + 1)
        ok = False
    else:
        ids[rid] = f"{table.fname}:{lineno}"
    cat = row[col["category"]].strip()
    category = cats.get(cat)
    if category is not None:
        cat = category.name or cat  # the one string object of ruleset.toml, shared by all rules
    if category is None:
        known = ", ".join(sorted(cats))
        probs.add(table.fname, lineno, f"unknown category {cat!r} (ruleset.toml has: {known})", col["category"] + 1)
        ok = False
    ai = col.get("action")
    action = row[ai].strip() if ai is not None else ""
    if action and action not in RULE_ACTIONS:
        probs.add(table.fname, lineno, f"unknown action {action!r} (use block or log, or leave empty)", ai + 1)  # type: ignore[operator]
        ok = False
    if not ok or category is None:
        return None
    return rid, cat, (action or category.action)  # type: ignore[return-value]


_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _invisible(s: str) -> bool:
    """True when ``s`` is only whitespace and format (Cf) characters."""
    import unicodedata

    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in s)


def keyword_problem(keyword: str, flags: frozenset[str], norm: str | None = None) -> tuple[str, str]:
    """("", normalised keyword) or (reason, "") for one keyword (a plain function, so
    ``rules check`` and the tests share the exact messages). ``norm``: the keyword
    already normalised, when the caller did it in bulk."""
    if keyword == "":
        return "empty keyword", ""
    if len(keyword) > MAX_KEYWORD_CHARS:
        return (f"keyword is {len(keyword)} characters; at most {MAX_KEYWORD_CHARS} "
                f"(a keyword is a phrase, not a text)"), ""
    bad = _CONTROL.search(keyword)
    if bad:
        return f"control character U+{ord(bad.group()):04X} in keyword", ""
    if norm is None:
        norm = normalize(keyword)
    if not norm:
        if _invisible(keyword):
            return "keyword has only blank or invisible characters", ""
        return "keyword is empty after normalisation (only separators or invisible characters)", ""
    if "exact" in flags:
        if norm != keyword:
            return (f"flag 'exact' but the keyword is not in normalised form; scanned text "
                    f"would read it as {norm!r}"), ""
        return "", keyword
    return "", norm


_NO_FLAGS: frozenset[str] = frozenset()


def _keywords(path: Path, cats: dict[str, Category], ids: dict[str, str], probs: _Problems) -> list[KeywordRule]:
    table = _Table("keywords.tsv", ("id", "category", "keyword"), ("action", "flags"))
    flags_cache: dict[str, frozenset[str]] = {"": _NO_FLAGS}
    # First every row's id, category, action and flags; then the keywords, normalised
    # in bulk (normalize_many), so 1M keywords load in seconds.
    pending: list[tuple[int, tuple[str, str, RuleAction] | None, str, frozenset[str]]] = []
    for lineno, row in table.rows(path, probs):
        common = _common(table, row, lineno, cats, ids, probs)
        fi = table.index("flags")
        flags_raw = row[fi] if fi is not None else ""
        flags = flags_cache.get(flags_raw)
        if flags is None:
            names = [f.strip() for f in flags_raw.split(",") if f.strip()]
            unknown = [f for f in names if f not in KEYWORD_FLAGS]
            if unknown:
                probs.add(table.fname, lineno, f"unknown flag {unknown[0]!r} "
                          f"(known: {', '.join(sorted(KEYWORD_FLAGS))})", fi + 1)  # type: ignore[operator]
                continue
            flags = flags_cache[flags_raw] = frozenset(names)
        pending.append((lineno, common, row[table.columns["keyword"]], flags))
    norms = normalize_many([
        kw if len(kw) <= MAX_KEYWORD_CHARS and "\x00" not in kw else "" for _, _, kw, _ in pending
    ])
    out: list[KeywordRule] = []
    append = out.append
    kcol = table.columns.get("keyword", 0) + 1
    for (lineno, common, keyword, flags), norm in zip(pending, norms):
        reason, pattern = keyword_problem(keyword, flags, norm)
        if reason:
            probs.add(table.fname, lineno, reason, kcol)
        elif common is not None:
            if pattern == keyword:
                pattern = keyword  # one string object, not two equal ones (1M rules: ~80 MB)
            append(KeywordRule(common[0], common[1], keyword, common[2], flags, pattern))
    probs.sort()
    return out


def _domains(path: Path, cats: dict[str, Category], ids: dict[str, str], probs: _Problems) -> list[DomainRule]:
    table = _Table("domains.tsv", ("id", "category", "domain"), ("action",))
    out: list[DomainRule] = []
    for lineno, row in table.rows(path, probs):
        common = _common(table, row, lineno, cats, ids, probs)
        domain = row[table.columns["domain"]]
        try:
            pat = parse_domain_pattern(domain)
        except ValueError as e:
            probs.add(table.fname, lineno, f"malformed domain {domain[:80]!r}: {e}", table.columns["domain"] + 1)
            continue
        if common is not None:
            written = domain.strip()
            # Share one string when the pattern is already canonical (1M rules: ~60 MB).
            name = written if written == pat.name else pat.name
            out.append(DomainRule(common[0], common[1], written, common[2], pat.mode, name))  # type: ignore[arg-type]
    return out


def _urls(path: Path, cats: dict[str, Category], ids: dict[str, str], probs: _Problems) -> list[UrlRule]:
    table = _Table("urls.tsv", ("id", "category", "url"), ("action",))
    out: list[UrlRule] = []
    for lineno, row in table.rows(path, probs):
        common = _common(table, row, lineno, cats, ids, probs)
        url = row[table.columns["url"]]
        try:
            u = parse_url_rule(url)
        except ValueError as e:
            probs.add(table.fname, lineno, f"malformed url {url[:80]!r}: {e}", table.columns["url"] + 1)
            continue
        if common is not None:
            out.append(UrlRule(common[0], common[1], url.strip(), common[2], u.host, u.path_prefix,
                               u.mode, u.query_prefix))  # type: ignore[arg-type]
    return out


def parse_weight(text: str) -> int | None:
    """The ``weight`` field: None when empty, else an integer; ValueError otherwise."""
    text = text.strip()
    if not text:
        return None
    try:
        weight = int(text)
    except ValueError:
        raise ValueError(f"weight {text[:20]!r} is not an integer") from None
    if abs(weight) > MAX_WEIGHT:
        raise ValueError(f"weight {weight} is beyond ±{MAX_WEIGHT}")
    return weight


def phrase_parts(phrase: str) -> tuple[str, ...]:
    """The normalised parts of a ``phrase`` field; ValueError names the bad part."""
    raw = phrase.split(",")
    if len(raw) > MAX_PHRASE_PARTS:
        raise ValueError(f"{len(raw)} parts; at most {MAX_PHRASE_PARTS}")
    parts: list[str] = []
    for i, part in enumerate(raw, start=1):
        reason, norm = keyword_problem(part.strip(), _NO_FLAGS)
        if reason:
            raise ValueError(f"part {i}: {reason}" if len(raw) > 1 else reason)
        if norm not in parts:
            parts.append(norm)
    return tuple(parts)


def _phrases(path: Path, cats: dict[str, Category], ids: dict[str, str], probs: _Problems) -> list[PhraseRule]:
    table = _Table("phrases.tsv", ("id", "category", "phrase"), ("weight", "action"))
    out: list[PhraseRule] = []
    for lineno, row in table.rows(path, probs):
        common = _common(table, row, lineno, cats, ids, probs)
        phrase = row[table.columns["phrase"]]
        try:
            parts = phrase_parts(phrase)
        except ValueError as e:
            probs.add(table.fname, lineno, f"phrase {phrase[:60]!r}: {e}", table.columns["phrase"] + 1)
            continue
        wi = table.index("weight")
        try:
            weight = parse_weight(row[wi]) if wi is not None else None
        except ValueError as e:
            probs.add(table.fname, lineno, str(e), wi + 1)  # type: ignore[operator]
            continue
        if common is None:
            continue
        if weight is not None and cats[common[1]].threshold is None:
            probs.add(table.fname, lineno, f"weighted phrase but category {common[1]!r} has no "
                      f"threshold (add threshold = N to [categories.{common[1]}])", wi + 1)  # type: ignore[operator]
            continue
        out.append(PhraseRule(common[0], common[1], phrase.strip(), common[2], parts, weight))
    return out


RULE_FILES = ("keywords.tsv", "domains.tsv", "urls.tsv", "phrases.tsv")
"""The optional rule files, in the order they are read (ids are unique across them)."""


def _read(path: str | os.PathLike[str]) -> tuple[RuleSet | None, list[RuleProblem]]:
    root = Path(path)
    probs = _Problems()
    if not root.is_dir():
        probs.add(str(root), 0, "not a directory (a rule set is a directory with ruleset.toml)")
        return None, probs.finish()
    head = _load_toml(root / "ruleset.toml", probs)
    cats = head[2] if head else {}
    ids: dict[str, str] = {}
    lists: dict[str, list] = {}
    readers = {"keywords.tsv": _keywords, "domains.tsv": _domains, "urls.tsv": _urls,
               "phrases.tsv": _phrases}
    for fname in RULE_FILES:
        p = root / fname
        if p.exists():
            if not p.is_file():
                probs.add(fname, 0, "not a regular file")
                continue
            if p.stat().st_size == 0:
                probs.add(fname, 0, "empty file: expected a header line naming the columns "
                                    "(delete the file if the rule set has no such rules)")
                continue
            lists[fname] = readers[fname](p, cats, ids, probs)
    problems = probs.finish()
    if problems or head is None:
        return None, problems
    name, version, cats = head
    return RuleSet(
        name=name,
        version=version,
        categories=cats,
        keywords=lists.get("keywords.tsv", []),
        domains=lists.get("domains.tsv", []),
        urls=lists.get("urls.tsv", []),
        phrases=lists.get("phrases.tsv", []),
    ), []


def check_ruleset(path: str | os.PathLike[str]) -> list[RuleProblem]:
    """Every problem of the rule set at ``path`` (empty when it is valid)."""
    return _read(path)[1]


def load_ruleset(path: str | os.PathLike[str]) -> RuleSet:
    """The rule set at ``path``; raises ``RuleSetError`` carrying every problem."""
    ruleset, problems = _read(path)
    if ruleset is None:
        raise RuleSetError(problems)
    return ruleset
