"""The Engine: one compiled rule set answering every adapter (DESIGN.md).

Strategy: each question is reduced to *text runs* (rules/decode.py,
rules/target.py), every run is normalised (rules/normalize.py) and streamed
through one keyword matcher stream (rules/matcher.py), which is reset at each
run break so that a keyword never spans two runs. Host names go to the domain
matcher, host + path to the URL matcher. The answer is a ``Verdict``.

Rules kept here:
1. Sans-IO: bytes and headers in, ``Verdict`` out; no socket, file, clock or loop
   (STYLE.md 1). ``from_dir`` is the only function that reads files, and it is
   only called off the data path (start-up, reload).
2. Immutable after ``compile``: an Engine is shared by every connection and
   thread; per-message state lives in ``BodyScan``.
3. Whole or in pieces, same answer (STYLE.md 3): ``http_request`` is
   ``request_scanner`` fed once.
4. Phrases (phrases.tsv: combinations and weighted phrases, rules/ruleset.py) cost
   no second pass: every distinct phrase part is one more keyword of the same
   matcher (``PhraseTable``); a part's hit is remembered per message, and a phrase
   is found when all its parts have been seen in that message (target and body
   of one HTTP message, or one ``scan_text``). Weights sum over distinct phrases
   per category; ``Match.kind`` is ``"phrase"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rules.containers import RUN_BREAK, Normalized
from rules.decode import BodyDecoder, Break, DecodeLimits, Text
from rules.domains import DomainMatcher
from rules.matcher import KeywordMatcher, KeywordStream, char_offsets
from rules.normalize import Normalizer
from rules.ruleset import KeywordRule, PhraseRule, RuleSet, load_ruleset
from rules.target import host_of, idna_text, target_runs
from rules.urls import UrlMatcher
from rules.verdict import SNIPPET_CHARS, Match, Verdict, combine_action

Headers = Sequence[tuple[bytes, bytes]]

SAMPLE_RULES = Path(__file__).resolve().parent / "sample"
"""The sample rule set shipped in the package: the default of `linewarden run`."""

SNIPPET_TAIL = 256
"""Characters of normalised text kept behind the matcher stream per run, for
snippets. Longer than any keyword (rules/ruleset.py caps them) plus the
snippet's context, so the text before a match is always at hand."""


PHRASE_PART_FLAG = "phrase-part"
"""Flag of the keyword rules the Engine makes of phrase parts (never in a rule file)."""


@dataclass(frozen=True, slots=True)
class PhraseTable:
    """Phrases compiled into the keyword matcher: part ``k`` is keyword index ``base + k``."""

    rules: list[PhraseRule]
    base: int
    """Keyword-matcher index of part 0 (the rule set's own keywords come first)."""
    part_phrases: list[tuple[int, ...]]
    """Part → the phrases (indices into ``rules``) that contain it."""
    phrase_parts: list[tuple[int, ...]]
    """Phrase → its part indices."""
    thresholds: dict[str, int]

    @classmethod
    def build(cls, ruleset: RuleSet) -> tuple[PhraseTable, list[KeywordRule]]:
        """The table and the part keywords to append to the rule set's keywords."""
        index: dict[str, int] = {}
        parts: list[KeywordRule] = []
        part_phrases: list[list[int]] = []
        phrase_parts: list[tuple[int, ...]] = []
        for pi, rule in enumerate(ruleset.phrases):
            ks: list[int] = []
            for part in rule.parts:
                k = index.get(part)
                if k is None:
                    k = index[part] = len(parts)
                    parts.append(KeywordRule(f"phrase-part:{k}", rule.category, part, "log",
                                             frozenset({PHRASE_PART_FLAG}), part))
                    part_phrases.append([])
                part_phrases[k].append(pi)
                ks.append(k)
            phrase_parts.append(tuple(ks))
        thresholds = {name: c.threshold for name, c in ruleset.categories.items()
                      if c.threshold is not None}
        table = cls(ruleset.phrases, len(ruleset.keywords), [tuple(p) for p in part_phrases],
                    phrase_parts, thresholds)
        return table, parts


@dataclass(frozen=True, slots=True)
class Engine:
    """A compiled, immutable rule set."""

    ruleset: RuleSet
    keywords: KeywordMatcher
    domains: DomainMatcher
    urls: UrlMatcher
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    _allow: Verdict = field(init=False, repr=False, compare=False)
    """The plain allow verdict, built once: most questions get it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allow", Verdict("allow", (), self.ruleset.version))
    phrases: PhraseTable | None = None
    """None when the rule set has no phrases (the common case costs nothing)."""

    @classmethod
    def compile(
        cls, ruleset: RuleSet, *, backend: str = "auto", limits: DecodeLimits | None = None
    ) -> Engine:
        keywords = ruleset.keywords
        phrases = None
        if ruleset.phrases:
            phrases, parts = PhraseTable.build(ruleset)
            keywords = [*keywords, *parts]
        return cls(
            ruleset=ruleset,
            keywords=KeywordMatcher.compile(keywords, backend=backend),
            domains=DomainMatcher.compile(ruleset.domains),
            urls=UrlMatcher.compile(ruleset.urls),
            limits=limits or DecodeLimits(),
            phrases=phrases,
        )

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs: object) -> Engine:
        """Load, validate and compile a rule-set directory (raises ``RuleSetError``)."""
        return cls.compile(load_ruleset(Path(path)), **kwargs)  # type: ignore[arg-type]

    @property
    def version(self) -> int:
        return self.ruleset.version

    @property
    def name(self) -> str:
        return self.ruleset.name

    # -- names -------------------------------------------------------------

    def host(self, host: str | None, where: str = "host") -> Verdict:
        return self._verdict(self._host_matches(host, where))

    def dns(self, qname: str, qtype: int | str = 1) -> Verdict:
        """A DNS question. Only domain rules apply: a name is not prose."""
        return self._verdict(self._domain_matches(qname, "qname"))

    def dns_chain(self, names: Iterable[str]) -> Verdict:
        """The CNAME targets of an answer: blocked when any is listed."""
        found: list[Match] = []
        for name in names:
            found.extend(self._domain_matches(name, "cname"))
        return self._verdict(found)

    def tls(self, sni: str | None) -> Verdict:
        """A ClientHello's SNI (none: nothing to decide on, allowed)."""
        return self._verdict(self._domain_matches(sni, "sni") if sni else [])

    def scan_text(self, text: str, where: str = "text") -> Verdict:
        """One run of plain text."""
        scan = _RunScanner(self)
        scan.text(where, text)
        return self._verdict(scan.matches)

    # -- HTTP --------------------------------------------------------------

    def request_scanner(self, method: str, target: bytes, headers: Headers) -> BodyScan:
        host = host_of(target, headers)
        head = _RunScanner(self)
        head.extend(self._host_matches(host, "host"))
        head.extend(self._url_matches(host, target))
        head.events(target_runs(target), final=True)
        decoder = BodyDecoder(list(headers), is_request=True, limits=self.limits)
        return BodyScan(self, head, decoder)

    def response_scanner(self, status: int, headers: Headers) -> BodyScan:
        decoder = BodyDecoder(list(headers), is_request=False, limits=self.limits)
        return BodyScan(self, _RunScanner(self), decoder)

    def http_request(
        self, method: str, target: bytes, headers: Headers, body: bytes = b""
    ) -> Verdict:
        scan = self.request_scanner(method, target, headers)
        scan.feed(body)
        return scan.finish()

    def http_response(self, status: int, headers: Headers, body: bytes = b"") -> Verdict:
        scan = self.response_scanner(status, headers)
        scan.feed(body)
        return scan.finish()

    # -- internals ---------------------------------------------------------

    def _verdict(
        self, matches: Iterable[Match], *, truncated: bool = False, errors: Iterable[str] = ()
    ) -> Verdict:
        unique = tuple(_first_per_rule(matches))
        if not unique and not truncated and not errors:
            return self._allow
        return Verdict(
            action=combine_action(unique),
            matches=unique,
            ruleset_version=self.version,
            truncated=truncated,
            errors=tuple(errors),
        )

    def _domain_matches(self, name: str | None, where: str) -> list[Match]:
        if not name:
            return []
        return [
            Match(r.id, r.category, "domain", r.pattern, r.action, where, name)
            for r in self.domains.match(name)
        ]

    def _host_matches(self, host: str | None, where: str) -> list[Match]:
        found = self._domain_matches(host, where)
        unicode_form = idna_text(host) if host else None
        if unicode_form:
            scan = _RunScanner(self)
            scan.text(where, unicode_form)
            found.extend(scan.matches)
        return found

    def _url_matches(self, host: str | None, target: bytes) -> list[Match]:
        if not host:
            return []
        path = _path_of(target)
        return [
            Match(r.id, r.category, "url", r.url, r.action, "url", f"{host}{path}"[:128])
            for r in self.urls.match(host, path)
        ]


class BodyScan:
    """Per-message state: feed body bytes as they arrive, read the verdict so far.

    ``feed`` returns a block verdict as soon as one block rule has fired, so a
    proxy can stop forwarding; ``finish`` flushes the decoders and gives the
    final verdict.
    """

    def __init__(self, engine: Engine, runs: _RunScanner, decoder: BodyDecoder) -> None:
        self._engine = engine
        self._runs = runs
        self._decoder = decoder
        self.head_verdict = engine._verdict(runs.matches)
        """The decision on the start line and headers alone (host, URL rules, target)."""
        self._verdict = self.head_verdict
        self._done = False

    def feed(self, data: bytes) -> Verdict:
        if data and not self._done:
            self._runs.events(self._decoder.feed(data))
        return self._current()

    def finish(self) -> Verdict:
        if not self._done:
            self._runs.events(self._decoder.finish(), final=True)
            self._done = True
        return self._current()

    def _current(self) -> Verdict:
        # Most feeds change nothing: reuse the last Verdict rather than build one per piece.
        v, d = self._verdict, self._decoder
        if (len(v.matches) != len(self._runs.matches) or v.truncated != d.truncated
                or len(v.errors) != d.error_count):
            self._verdict = self._engine._verdict(
                self._runs.matches, truncated=d.truncated, errors=d.errors)
        return self._verdict


# RUN_BREAK is fed to the keyword stream where a text run ends. Keywords cannot
# contain it (rules/ruleset.py refuses NUL) and normalisation keeps it, so no
# match spans it; one stream per message then serves every run, which costs far
# less than a stream reset per paragraph. Decoders put it inside ``Text`` too.


class _RunScanner:
    """Streams the text runs of one message through one keyword stream.

    Each call normalises its events and feeds the matcher once with the result:
    a request-target or a page piece holds many runs, and one matcher call per
    run would cost more than the matching itself.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._stream: KeywordStream | None = None
        """Opened on the first text: a GET without a query never needs one."""
        self._where = "text"
        self._normalizer = Normalizer()
        self._tail = RUN_BREAK
        """Normalised text most recently fed, last ``SNIPPET_TAIL`` characters."""
        self._tail_start = 0
        """Stream offset of ``_tail[0]``, minus one (the initial RUN_BREAK)."""
        self._fed = 0
        """Characters fed to the stream so far."""
        self.matches: list[Match] = []
        self._matched: set[int] = set()
        """Keyword rules already in ``matches``: the verdict keeps one Match per rule
        (``_first_per_rule``), so a page repeating a keyword builds its snippet once."""
        self._phrases = _PhraseState(engine.phrases) if engine.phrases is not None else None

    def extend(self, matches: Iterable[Match]) -> None:
        self.matches.extend(matches)

    def text(self, where: str, text: str) -> None:
        """One whole run."""
        self.events((Text(where, text),), final=True)

    def events(self, events: Iterable[Text | Break | Normalized], *, final: bool = False) -> None:
        """Feed events; ``final`` ends the current run after them."""
        parts: list[str] = []
        wheres: list[tuple[int, str]] = [(0, self._where)]
        size = 0
        normalizer = self._normalizer
        for ev in events:
            if isinstance(ev, Break):
                size += self._end_run(parts)
                continue
            if ev.where != self._where:
                size += self._end_run(parts)
                self._where = ev.where
                wheres.append((size, ev.where))
            if isinstance(ev, Text):
                piece = normalizer.feed(ev.text)
                if piece:
                    parts.append(piece)
                    size += len(piece)
                continue
            # Normalized: the compiled HTML scanner normalised it already; what came
            # before is matched first, in order.
            if parts:
                self._scan("".join(parts), wheres)
                parts, size, wheres = [], 0, [(0, self._where)]
            self._scan_utf8(ev.data, ev.chars)
        if final:
            self._end_run(parts)
        if parts:
            self._scan("".join(parts), wheres)

    def _end_run(self, parts: list[str]) -> int:
        # The normaliser holds back a tail that could combine with what follows;
        # the run ends here, so the tail is final and is matched before the break.
        piece = self._normalizer.flush()
        last = parts[-1] if parts else self._tail
        if not piece and last.endswith(RUN_BREAK):
            return 0
        parts.append(piece + RUN_BREAK)
        return len(piece) + 1

    def _scan(self, norm: str, wheres: list[tuple[int, str]]) -> None:
        if self._stream is None:
            self._stream = self._engine.keywords.stream()
        self._matched_in(norm, self._stream.feed(norm), wheres)

    def _scan_utf8(self, data: bytes, chars: int) -> None:
        """``_scan`` of normalised UTF-8, decoded only around a hit (its snippet) and for
        the tail: a page holds ~50k characters, a snippet 48."""
        if self._stream is None:
            self._stream = self._engine.keywords.stream()
        hits = self._stream.feed_utf8_ends(data, chars)
        lengths = self._engine.keywords.pattern_bytes
        if chars < SNIPPET_TAIL or any(end < lengths[index] for index, end in hits):
            # Short, or a match that began in an earlier piece: the characters way.
            ends = char_offsets(data, [end for _, end in hits])
            self._matched_in(data.decode("utf-8"),
                             [(index, self._fed + c) for (index, _), c in zip(hits, ends)],
                             [(0, self._where)])
            return
        for index, end in hits:
            if index not in self._matched:
                start = end - lengths[index]
                self._hit(index, self._where, lambda: self._snippet_utf8(data, start, end))
        # The last SNIPPET_TAIL characters: at most 4 bytes each, cut at a character start.
        piece = data[-4 * SNIPPET_TAIL:]
        cut = 0
        while 0x80 <= piece[cut] < 0xC0:
            cut += 1
        self._fed += chars
        self._tail = piece[cut:].decode("utf-8")[-SNIPPET_TAIL:]
        self._tail_start = self._fed + 1 - len(self._tail)

    def _snippet_utf8(self, data: bytes, start: int, end: int) -> str:
        """``_snippet`` of a match at ``data[start:end]``: the same characters, decoded
        from at most 4 bytes a character on either side."""
        reach = 4 * SNIPPET_CHARS
        lo = max(0, start - reach)
        while lo and 0x80 <= data[lo] < 0xC0:
            lo += 1
        before = data[lo:start].decode("utf-8")
        if lo == 0 and len(before) < SNIPPET_CHARS:
            before = self._tail + before  # the characters before this piece
        before = before[-SNIPPET_CHARS:].rpartition(RUN_BREAK)[2]
        # "ignore" drops only a character cut at the window's end (the text is valid).
        after = data[end:end + reach].decode("utf-8", "ignore")[:SNIPPET_CHARS]
        return before + data[start:end].decode("utf-8") + after.partition(RUN_BREAK)[0]

    def _matched_in(self, norm: str, hits: list[tuple[int, int]],
                    wheres: list[tuple[int, str]]) -> None:
        buf = self._tail + norm
        base = self._fed
        matched = self._matched
        for index, end in hits:
            if index not in matched:
                self._hit(index, _where_at(wheres, end - 1 - base),
                          lambda: self._snippet(index, end, buf))
        self._fed += len(norm)
        cut = max(0, len(buf) - SNIPPET_TAIL)
        self._tail_start += cut
        self._tail = buf[cut:]

    def _hit(self, index: int, where: str, snippet: Callable[[], str]) -> None:
        rule = self._engine.keywords.rules[index]
        phrases = self._phrases
        if phrases is not None and index >= phrases.table.base:
            if index - phrases.table.base not in phrases.seen:
                phrases.part(index - phrases.table.base, where, snippet(), self.matches)
            return
        self._matched.add(index)
        self.matches.append(Match(rule.id, rule.category, "keyword", rule.keyword, rule.action,
                                  where, snippet()))

    def _snippet(self, index: int, end: int, buf: str) -> str:
        rel_end = end + 1 - self._tail_start
        rel_start = rel_end - len(self._engine.keywords.patterns[index])
        before = buf[max(0, rel_start - SNIPPET_CHARS) : rel_start].rpartition(RUN_BREAK)[2]
        after = buf[rel_end : rel_end + SNIPPET_CHARS].partition(RUN_BREAK)[0]
        return before + buf[rel_start:rel_end] + after


class _PhraseState:
    """Per-message phrase bookkeeping: parts seen, phrases found, weights summed."""

    __slots__ = ("table", "seen", "found", "fired", "weights")

    def __init__(self, table: PhraseTable) -> None:
        self.table = table
        self.seen: set[int] = set()
        self.found: list[int] = []
        self.fired: set[int] = set()
        self.weights: dict[str, int] = {}

    def part(self, k: int, where: str, snippet: str, out: list[Match]) -> None:
        """Part ``k`` seen for the first time: append the Matches of phrases that fire."""
        self.seen.add(k)
        table = self.table
        for pi in table.part_phrases[k]:
            rule = table.rules[pi]
            if not all(p in self.seen for p in table.phrase_parts[pi]):
                continue
            self.found.append(pi)
            if rule.weight is None:
                self._fire(pi, where, snippet, out)
                continue
            total = self.weights.get(rule.category, 0) + rule.weight
            self.weights[rule.category] = total
            if total >= table.thresholds[rule.category]:
                for fi in self.found:
                    other = table.rules[fi]
                    if (other.category == rule.category and other.weight is not None
                            and other.weight > 0):
                        self._fire(fi, where, f"[{total}/{table.thresholds[rule.category]}] {snippet}", out)

    def _fire(self, pi: int, where: str, snippet: str, out: list[Match]) -> None:
        if pi in self.fired:
            return
        self.fired.add(pi)
        r = self.table.rules[pi]
        out.append(Match(r.id, r.category, "phrase", r.phrase, r.action, where, snippet))



def _where_at(wheres: list[tuple[int, str]], offset: int) -> str:
    """The ``where`` of the run holding batch offset ``offset`` (few entries: linear)."""
    where = wheres[0][1]
    for start, name in wheres:
        if start > offset:
            break
        where = name
    return where


def _first_per_rule(matches: Iterable[Match]) -> Iterable[Match]:
    seen: set[str] = set()
    for m in matches:
        if m.rule_id not in seen:
            seen.add(m.rule_id)
            yield m


def _path_of(target: bytes) -> str:
    """The path of a request-target (origin or absolute form), without the query."""
    text = target.decode("latin-1")
    if "://" in text:
        text = text.split("://", 1)[1]
        slash = text.find("/")
        text = text[slash:] if slash >= 0 else "/"
    return text.split("?", 1)[0].split("#", 1)[0] or "/"
