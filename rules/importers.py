"""Importers: the block lists people already have, converted into a rule-set directory.

Owns: one line parser per list format (plain module-level functions returning a
``NamedTuple``, or ``None`` for a line that carries nothing, or raising ``ValueError``
with a readable reason; STYLE.md 7), stable rule ids, and merging the converted
rules into a rule-set directory without touching the rules that came from elsewhere.
Must not: be used on the data path (it reads and writes files; ``rules import`` and
tests call it), or invent semantics a format does not have: whatever cannot be
expressed exactly is skipped and reported, never approximated silently.

Formats and what they become:

``hosts``       ``0.0.0.0 name [name...]`` / ``127.0.0.1 name`` (also ``::``, ``::1``)
                → domains.tsv ``=name`` (exact names, as a hosts file means them).
                ``localhost`` and friends are skipped (they are the file's own
                boilerplate, not block entries).
``domains``     one name a line (``#``/``!`` comments) → domains.tsv as written in our
                domain syntax: ``name`` = the name and its subdomains, ``=name`` exact,
                ``*.name`` subdomains only.
``adblock``     AdBlock Plus / AdGuard ``||name^`` → domains.tsv ``name`` (name and
                subdomains). ``$important``, ``$document``, ``$all`` keep that meaning
                and are taken; any other modifier narrows the rule (``$third-party``,
                ``$script``, ``$domain=`` …) and the line is skipped and reported, since
                a domain rule would block more than the list asks. Exceptions (``@@``),
                cosmetic (``##``), paths and regular expressions are skipped and reported.
``e2guardian``  phrase lists → phrases.tsv: ``<a>`` banned phrase, ``<a>,<b>``
                combination, ``<a><30>`` / ``<a>,<b><-10>`` weighted; ``.Include<path>``
                is followed (relative to the including file when the path does not
                exist as written, at most ``MAX_INCLUDE_DEPTH`` deep, each file once).

Stable ids: ``<format>.<source tag>.<entry hash>`` where the source tag is 8 hex digits
of SHA-256 of the list's file name and the entry hash 12 hex digits of SHA-256 of the
canonical entry. So re-importing an updated list keeps the id (and the line) of every
unchanged entry; the rules of that source that are gone from the list are removed,
new ones appended, and rows of other sources or written by hand are left as they are.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from rules.domains import parse_domain_pattern
from rules.ruleset import parse_weight, phrase_parts

FORMATS = ("hosts", "domains", "adblock", "e2guardian")

MAX_INCLUDE_DEPTH = 8
"""``.Include`` nesting followed at most (e2guardian's stock lists nest 2 deep);
deeper is almost certainly a loop through differently spelled paths."""

MAX_LIST_BYTES = 256 * 1024 * 1024
"""Largest list file read (the biggest public host lists are ~50 MB)."""

DEFAULT_THRESHOLD = 50
"""Threshold given to a category that receives weighted phrases and has none:
e2guardian's default ``naughtynesslimit`` (the value its stock lists are tuned for)."""

_HOSTS_SINKS = frozenset({"0.0.0.0", "127.0.0.1", "::", "::1", "0:0:0:0:0:0:0:0", "0:0:0:0:0:0:0:1"})
_HOSTS_BOILERPLATE = frozenset({
    "localhost", "localhost.localdomain", "local", "broadcasthost", "ip6-localhost",
    "ip6-loopback", "ip6-localnet", "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters",
    "ip6-allhosts", "0.0.0.0",
})
_ADBLOCK_KEEP = frozenset({"important", "document", "doc", "all"})


class DomainEntry(NamedTuple):
    pattern: str
    """In domains.tsv syntax (``=name`` exact, ``name`` suffix, ``*.name`` strict-sub)."""


class PhraseEntry(NamedTuple):
    phrase: str
    """Parts joined by ``,`` (phrases.tsv syntax)."""
    weight: int | None


class Include(NamedTuple):
    path: str


class Skip(Exception):
    """A line that is understood but deliberately not imported (reported, not an error)."""


# ----------------------------------------------------------------------- line parsers


def parse_hosts_line(line: str) -> list[DomainEntry] | None:
    """One hosts-file line: its names as exact-name entries, or None (blank, comment)."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    fields = text.split()
    try:
        ipaddress.ip_address(fields[0].split("%", 1)[0])
    except ValueError:
        raise ValueError(f"{fields[0][:40]!r} is not an address (hosts lines are ADDRESS NAME...)") from None
    if len(fields) < 2:
        raise ValueError("address without a name")
    names = [n for n in fields[1:] if n.lower() not in _HOSTS_BOILERPLATE]
    if not names:
        raise Skip("localhost boilerplate")
    if fields[0] not in _HOSTS_SINKS:
        raise Skip(f"maps to {fields[0]} (a redirect, not a block: only 0.0.0.0, 127.0.0.1, "
                   f"::, ::1 lines are taken)")
    out = []
    for name in names:
        pat = parse_domain_pattern("=" + name)  # ValueError names the problem
        out.append(DomainEntry("=" + pat.name))
    return out


def parse_domain_line(line: str) -> DomainEntry | None:
    """One line of a plain domain list, in domains.tsv syntax."""
    text = line.strip()
    if not text or text[0] in "#!":
        return None
    text = text.split(" #", 1)[0].split("\t#", 1)[0].strip()
    if " " in text or "\t" in text:
        raise ValueError("more than one field (is this a hosts file? use --format hosts)")
    pat = parse_domain_pattern(text)
    prefix = {"exact": "=", "strict-sub": "*.", "suffix": ""}[pat.mode]
    return DomainEntry(prefix + pat.name)


_ADBLOCK_DOMAIN = re.compile(r"\|\|([^/^$|*]+)\^?(\|)?(?:\$(.*))?\Z")


def parse_adblock_line(line: str) -> DomainEntry | None:
    """One AdBlock Plus / AdGuard line: ``||name^`` (with harmless modifiers) → suffix rule."""
    text = line.strip()
    if not text or text.startswith("!") or (text.startswith("[") and text.endswith("]")):
        return None
    if text.startswith("@@"):
        raise Skip("exception rule (@@): allow-listing is not supported")
    if "##" in text or "#@#" in text or "#?#" in text or "#$#" in text or "#%#" in text:
        raise Skip("cosmetic (element hiding) rule: not a network rule")
    if text.startswith("/") and text.rstrip("/").count("/") >= 1 and text.endswith("/"):
        raise Skip("regular expression: not supported")
    if not text.startswith("||"):
        raise Skip("not a ||domain^ rule (address or path patterns are not supported)")
    m = _ADBLOCK_DOMAIN.match(text)
    if m is None:
        raise Skip("a path or wildcard after the domain: only whole domains (||name^) are supported")
    name, mods = m.group(1), m.group(3)
    if mods is not None:
        names = [x.strip() for x in mods.split(",") if x.strip()]
        narrowing = [x for x in names if x.lstrip("~").split("=", 1)[0] not in _ADBLOCK_KEEP]
        if narrowing:
            raise Skip(f"unsupported modifier ${narrowing[0]}: it narrows the rule, and a domain "
                       f"rule would block more than the list asks")
    pat = parse_domain_pattern(name)
    return DomainEntry(pat.name)


_E2G_PART = re.compile(r"<([^<>]*)>")
_E2G_INCLUDE = re.compile(r"\.include\s*<([^<>]+)>\s*\Z", re.IGNORECASE)


def parse_e2guardian_line(line: str) -> PhraseEntry | Include | None:
    """One e2guardian phrase-list line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    inc = _E2G_INCLUDE.match(text)
    if inc:
        return Include(inc.group(1).strip())
    if text.lower().startswith(("listcategory:", ".include")):
        if text.lower().startswith("listcategory:"):
            return None
        raise ValueError("malformed .Include (expected .Include<path>)")
    last = text.rfind(">")
    if last >= 0 and text[last + 1:].lstrip().startswith("#"):
        text = text[:last + 1]  # a trailing comment; a '#' inside <...> is part of the phrase
    pos, groups = 0, []
    for m in _E2G_PART.finditer(text):
        between = text[pos:m.start()].strip()
        if between not in ("", ","):
            raise ValueError(f"unexpected {between[:20]!r} between <...> groups")
        groups.append((m.group(1), between))
        pos = m.end()
    if not groups or text[pos:].strip():
        raise ValueError("expected <phrase>, <a>,<b> or <phrase><weight>")
    weight: int | None = None
    if len(groups) > 1 and groups[-1][1] == "" and re.fullmatch(r"\s*-?\d+\s*", groups[-1][0]):
        weight = parse_weight(groups.pop()[0])
    for i, (_, sep) in enumerate(groups):
        if i and sep != ",":
            raise ValueError("parts of a combination are separated by ','")
    parts = [g[0].strip() for g in groups]
    for p in parts:
        if "," in p:
            raise ValueError(f"part {p[:30]!r} contains ',' (phrases.tsv separates parts with it)")
    phrase = ",".join(parts)
    phrase_parts(phrase)  # the same checks rules/ruleset.py will make
    return PhraseEntry(phrase, weight)


# --------------------------------------------------------------------------- importing


@dataclass
class ImportReport:
    """What an import took and skipped, and why."""

    taken: int = 0
    duplicates: int = 0
    added: int = 0
    removed: int = 0
    kept: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)
    """(file, line, reason) for every line not taken."""
    notes: list[str] = field(default_factory=list)
    version: int | None = None

    def summary(self) -> str:
        lines = [f"taken {self.taken} entries ({self.duplicates} duplicates merged): "
                 f"{self.added} new, {self.kept} unchanged, {self.removed} removed"]
        reasons = Counter(":".join(reason.split(":")[:2]) for _, _, reason in self.skipped)
        lines.append(f"skipped {len(self.skipped)} lines"
                     + ("" if not reasons else ": " + "; ".join(f"{n} × {r}" for r, n in reasons.most_common())))
        lines.extend(self.notes)
        return "\n".join(lines)


def stable_id(fmt: str, source: str, entry: str) -> str:
    """``<format>.<source tag>.<entry hash>`` (see the module docstring)."""
    return f"{fmt}.{source_tag(source)}.{hashlib.sha256(entry.encode()).hexdigest()[:12]}"


def source_tag(source: str) -> str:
    return hashlib.sha256(os.path.basename(source).encode()).hexdigest()[:8]


def _lines(path: Path) -> list[str]:
    size = path.stat().st_size
    if size > MAX_LIST_BYTES:
        raise ValueError(f"{path}: {size} bytes; at most {MAX_LIST_BYTES} are read")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="replace").splitlines()


def read_list(fmt: str, path: Path, report: ImportReport) -> list[DomainEntry | PhraseEntry]:
    """Every entry of one list file (following e2guardian includes), in order."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    out: list[DomainEntry | PhraseEntry] = []
    _read(fmt, path, report, out, set(), 0)
    return out


def _read(fmt: str, path: Path, report: ImportReport, out: list, seen: set[Path], depth: int) -> None:
    seen.add(path.resolve())
    parser = {"hosts": parse_hosts_line, "domains": parse_domain_line,
              "adblock": parse_adblock_line, "e2guardian": parse_e2guardian_line}[fmt]
    for lineno, line in enumerate(_lines(path), start=1):
        try:
            got = parser(line)
        except Skip as e:
            report.skipped.append((str(path), lineno, f"skipped: {e}"))
            continue
        except ValueError as e:
            report.skipped.append((str(path), lineno, f"malformed: {e}"))
            continue
        if got is None:
            continue
        if isinstance(got, Include):
            target = Path(got.path)
            if not target.exists():
                target = path.parent / Path(got.path).name
            if depth + 1 > MAX_INCLUDE_DEPTH:
                report.skipped.append((str(path), lineno, f"include too deep: more than {MAX_INCLUDE_DEPTH} levels"))
            elif not target.is_file():
                report.skipped.append((str(path), lineno, f"include not found: {got.path}"))
            elif target.resolve() in seen:
                report.skipped.append((str(path), lineno, f"include loop: {got.path} already read"))
            else:
                _read(fmt, target, report, out, seen, depth + 1)
            continue
        out.extend(got if isinstance(got, list) else [got])


def import_lists(fmt: str, files: list[Path], category: str, into: Path, *,
                 threshold: int | None = None, action: str = "block") -> ImportReport:
    """Convert ``files`` and merge them into the rule-set directory ``into``."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", category):
        raise ValueError(f"category {category!r}: lower-case letters, digits, '_' and '-'")
    report = ImportReport()
    into.mkdir(parents=True, exist_ok=True)
    changed = False
    weighted = False
    for f in files:
        entries = read_list(fmt, f, report)
        rows: dict[str, list[str]] = {}
        for e in entries:
            if isinstance(e, DomainEntry):
                rid, row = stable_id(fmt, str(f), e.pattern), [e.pattern]
            else:
                weighted |= e.weight is not None
                rid = stable_id(fmt, str(f), f"{e.phrase}\t{e.weight}")
                row = [e.phrase, "" if e.weight is None else str(e.weight)]
            if rid in rows:
                report.duplicates += 1
                continue
            rows[rid] = row
        report.taken += len(rows)
        fname, cols = (("phrases.tsv", ("id", "category", "phrase", "weight"))
                       if fmt == "e2guardian" else ("domains.tsv", ("id", "category", "domain")))
        changed |= _merge(into / fname, cols, f"{fmt}.{source_tag(str(f))}.", category, rows, report)
    changed |= _ensure_toml(into, category, action, threshold, weighted, report)
    if changed:
        report.version = bump_version(into)
        report.notes.append(f"version is now {report.version}")
    return report


def _merge(path: Path, cols: tuple[str, ...], prefix: str, category: str,
           rows: dict[str, list[str]], report: ImportReport) -> bool:
    """Replace the rows of one source (ids starting with ``prefix``) in a TSV file."""
    old_lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    header: list[str] | None = None
    out: list[str] = []
    pending = dict(rows)
    for line in old_lines:
        if not line.strip(" ") or line.lstrip(" ").startswith("#"):
            out.append(line)
            continue
        fields = line.split("\t")
        if header is None:
            header = [h.strip() for h in fields]
            missing = [c for c in cols if c not in header]
            if missing:
                raise ValueError(f"{path}: the header lacks {', '.join(missing)}")
            out.append(line)
            continue
        rid = fields[header.index("id")].strip() if len(fields) == len(header) else ""
        if not rid.startswith(prefix):
            out.append(line)
        elif rid in pending:
            new = _row(header, rid, category, cols, pending.pop(rid))
            report.kept += new == line
            out.append(new)
        else:
            report.removed += 1
    if header is None:
        header = list(cols)
        out.append("\t".join(cols))
    for rid, row in pending.items():
        out.append(_row(header, rid, category, cols, row))
        report.added += 1
    text = "\n".join(out) + "\n"
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    _write(path, text)
    return True


def _row(header: list[str], rid: str, category: str, cols: tuple[str, ...], values: list[str]) -> str:
    fields = [""] * len(header)
    fields[header.index("id")] = rid
    fields[header.index("category")] = category
    for name, value in zip(cols[2:], values):
        fields[header.index(name)] = value
    return "\t".join(fields)


def _ensure_toml(into: Path, category: str, action: str, threshold: int | None,
                 weighted: bool, report: ImportReport) -> bool:
    """Create ruleset.toml, add the category, set its threshold; bump the version when
    the rules changed (a pushed bundle must carry a higher version)."""
    path = into / "ruleset.toml"
    if not path.exists():
        _write(path, f'name = "{into.resolve().name}"\nversion = 0\n')
        report.notes.append(f"created {path}")
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    cat = data.get("categories", {}).get(category)
    if threshold is None and weighted and (cat is None or "threshold" not in cat):
        threshold = DEFAULT_THRESHOLD
        report.notes.append(f"category {category}: weighted phrases and no threshold; set "
                            f"threshold = {DEFAULT_THRESHOLD} (e2guardian's default naughtynesslimit)")
    if cat is None:
        text = text.rstrip("\n") + f'\n\n[categories.{category}]\naction = "{action}"\n'
        if threshold is not None:
            text += f"threshold = {threshold}\n"
        report.notes.append(f"added category {category} (action {action})")
    elif threshold is not None and cat.get("threshold") != threshold:
        head = re.compile(rf"^\[categories\.{re.escape(category)}\]\s*$", re.M)
        lines = text.split("\n")
        at = next(i for i, ln in enumerate(lines) if head.match(ln))
        end = next((j for j in range(at + 1, len(lines)) if lines[j].lstrip().startswith("[")), len(lines))
        lines = [ln for k, ln in enumerate(lines) if not (at < k < end and ln.strip().startswith("threshold"))]
        lines.insert(at + 1, f"threshold = {threshold}")
        text = "\n".join(lines)
        report.notes.append(f"category {category}: threshold = {threshold}")
    if text == path.read_text(encoding="utf-8"):
        return False
    _write(path, text)
    return True


def bump_version(into: Path) -> int:
    """Add one to ``version`` in ruleset.toml (text edit: comments and order stay)."""
    path = into / "ruleset.toml"
    text = path.read_text(encoding="utf-8")
    version = int(tomllib.loads(text).get("version", 0)) + 1
    new, n = re.subn(r"(?m)^version\s*=\s*\d+\s*$", f"version = {version}", text, count=1)
    if n == 0:
        new = f"version = {version}\n" + text
    _write(path, new)
    return version


def _write(path: Path, text: str) -> None:
    """Whole-file replace (never a half-written rule file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
