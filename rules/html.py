"""HTML -> the text runs a person sees, incrementally, without a per-character Python loop.

Owns: which markup ends a text run (block-level and replaced elements) and which does not
(inline elements, unknown elements, comments, ``<wbr>``), skipping the contents of
``<script>``/``<style>`` and friends, dropping attribute values, decoding character
references, and the carry that makes the result independent of how the input is split.

Must not: decode bytes (it takes ``str``; ``rules.charset`` decodes), normalise text, or
hold more than ``MAX_TAG_CHARS`` of an unfinished tag.

Output of ``feed_text``/``finish_text``: the runs as one string, ``"\x00"``
(``rules.containers.RUN_BREAK``) where a run ends, which the Engine scans as it is. Output
of ``feed``/``finish``: the same as a list of pieces, a ``str`` continuing the current run
and ``None`` ending it.

Strategy. One compiled regex (``_FAST``), anchored on the literal ``<`` (so ``re`` skips
text with a fast search), splits a chunk into text and markup in C. Each markup match is
one of: a tag (its name token captured in ``tag``), a complete comment or bogus comment,
a complete raw-text element (script/style...), or a *stop*: the start of something not
finished in this chunk. Whether a tag ends the run is decided after the split, by
looking its name token up in a dict of every ASCII-case spelling of the block names
through ``map`` (one C-level pass over all the tags, no lower-casing; a trie of block
names inside the regex cost half of the split). The text between
matches is joined with a break marker where a block tag stood and a separator where any
other markup stood, so that character references are decoded in one pass but never across
removed markup (a browser ends a reference at ``<``). At a stop, the rest is carried to
the next ``feed``; an unfinished comment or raw-text element switches to a state that
discards its contents, keeping only a short tail, so memory stays bounded. ``_MARKUP``
is the reference splitter (block tags told apart inside the regex, whole matches
captured): it is used when a stop is not the chunk's last match (its position needs
the match lengths) and for the one non-ASCII character whose ``str.lower`` is ASCII;
the tests check that both give the same runs.

Speed (benchmarks/bench_matcher.py pages, a tag every ~35 bytes): the cost is per tag,
not per byte - ``re`` spends about 0.25 µs on each match - so markup-dense pages run at
roughly 80-130 MB/s here however the text around the tags is handled.

Script and style contents vanish without a break: a reader sees ``六<script>..</script>合``
as contiguous text. Runs holding only whitespace between two breaks are not emitted.

Known simplifications (documented best effort): ``<title>``/``<textarea>`` contents are
parsed as markup rather than RCDATA (they still form their own run); the script-data
escape states (``<!--`` inside ``<script>``) are not modelled; content inside
``<noscript>`` and ``<template>`` is scanned as text (a reader with scripts off sees it).
"""

from __future__ import annotations

import html
import re
from itertools import product, repeat

MAX_TAG_CHARS = 64 * 1024
"""Longest unfinished tag carried between feeds. Real tags reach tens of KiB only with
inline ``data:`` URIs; past this bound the tag is ended at its first ``>`` or, without
one, only its first ``TAG_KEEP_CHARS`` are kept (attribute values are not text anyway)."""

TAG_KEEP_CHARS = 1024
"""What is kept of an over-long unfinished tag that has no ``>`` yet."""

ENTITY_TAIL_CHARS = 64
"""A trailing ``&...`` shorter than this is carried (the longest named reference,
``&CounterClockwiseContourIntegral;``, has 33 characters)."""

BLOCK_ELEMENTS = frozenset("""
address article aside blockquote body br button canvas caption center col colgroup dd
details dialog dir div dl dt embed fieldset figcaption figure footer form frame frameset
h1 h2 h3 h4 h5 h6 head header hgroup hr html iframe img input keygen legend li listing
main menu meter nav object ol optgroup option output p plaintext pre progress search
section select summary table tbody td textarea tfoot th thead title tr ul video audio xmp
""".split())
"""Elements that end a text run: the HTML Living Standard's rendering section (15.3.3
"Flow content", 15.3.7 "Lists", 15.3.8 "Tables", 15.3.11 "Form controls", 15.4
"Replaced elements") displays them as blocks, list items, table parts or replaced boxes,
so text on either side is on another line or in another box. ``br`` and ``hr`` break a
line. Everything else (``a b i u s em strong span font small mark sub sup code kbd abbr
cite ins del time wbr``, and unknown or custom elements, which the rendering section
makes inline) is rendered contiguously and does not end a run."""

RAW_TEXT_SKIPPED = ("script", "style", "noembed", "noframes")
"""Raw-text elements whose contents are never shown as text (HTML 13.1.2: the contents
of raw text elements are not markup; script and style are not rendered; noembed and
noframes contents are fallbacks that current browsers do not display). ``iframe`` is
raw text too, but a replaced element that ends a run: its (rare, undisplayed) fallback
content is scanned as markup instead, which can only add text."""

_WS = "\t\n\f\r "
# HTML 13.2.5.32-38 (attribute name and value states): a value is quoted only when its
# first character after "=" is a quote; an unquoted value runs to whitespace or ">".
_NAME = f"[^{_WS}/>=][^{_WS}/>=]*+"
_VALUE = f"""(?:"[^"]*+"|'[^']*+'|[^{_WS}>"'][^{_WS}>]*+|(?=>))"""
# "=" may start an attribute name (13.2.5.32), but not where it could open a quoted value
# whose closing quote has not arrived yet (that must stay unfinished, not end early).
_EQ_NAME = f"=(?![{_WS}]*+[\"'])[^{_WS}/>=]*+"
_ATTRS = f"(?:[{_WS}/]++|{_NAME}(?:[{_WS}]*+=[{_WS}]*+{_VALUE})?+|{_EQ_NAME})*+"
_END = f"(?=[{_WS}/>])"
_RAW_COMPLETE = "|".join(f"{n}{_END}{_ATTRS}>.*?</{n}{_END}[^>]*+>" for n in RAW_TEXT_SKIPPED)
_RAW_NAMES = "|".join(RAW_TEXT_SKIPPED)


def _trie(words: frozenset[str]) -> str:
    """An alternation of ``words`` factored by prefix: re tries branches one by one, so
    sharing prefixes makes the block-tag test several times faster."""
    tree: dict[str, dict] = {}
    for word in words:
        node = tree
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict[str, dict]) -> str:
        alts = [re.escape(c) + emit(sub) for c, sub in sorted(node.items()) if c]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(tree)


_BLOCK_NAMES = _trie(BLOCK_ELEMENTS)

# Alternatives are disjoint (tags start with a letter or "/" + letter and exclude the
# raw-text names; comments with "!"), so their order only matters for speed: tags, the
# commonest markup, are tried first. The stop alternative must stay last.
_MARKUP = re.compile(
    "(<(?:"
    f"(?P<brk>/?(?:{_BLOCK_NAMES}){_END}){_ATTRS}>"   # block tag: ends the run
    f"|(?:/[A-Za-z]|(?!(?:{_RAW_NAMES}){_END})[A-Za-z])[^{_WS}/>]*+{_ATTRS}>"  # other tag
    "|!--(?:-?>|.*?--!?>)"                       # comment (13.2.5.43-52), incl. <!--> and <!--->
    f"|{_RAW_COMPLETE}"                         # a whole script/style/... element
    "|!(?!--)[^>]*+>|\\?[^>]*+>|/(?![A-Za-z])[^>]*+>"  # bogus comments, </>
    f"|(?P<stop>!--|(?:{_RAW_NAMES}){_END}{_ATTRS}>|[!?/A-Za-z]|\\Z)"  # unfinished here
    "))",
    re.IGNORECASE | re.ASCII | re.DOTALL,  # tag names are ASCII case-insensitive
)
_STRIDE = 4  # re.split yields: text, whole match, brk, stop

# The fast splitter: the same language as _MARKUP, minus the block-tag alternative and the
# outer group, which cost about half of its time on markup-dense pages. A block tag is an
# "other tag" whose name token (up to whitespace, "/" or ">") is a block name; the token is
# captured and classified in C (``_SEP_OF``) instead of by a trie of alternatives.
_FAST = re.compile(
    "<(?:"
    # A start tag is not a raw-text one (all begin with "s" or "n": other letters skip
    # the lookahead, which costs a tenth of the split).
    f"(?P<tag>/[A-Za-z][^{_WS}/>]*+"
    f"|(?:[A-MO-RT-Za-mo-rt-z]|(?!(?:{_RAW_NAMES}){_END})[NnSs])[^{_WS}/>]*+)"
    # Without a quote before the first ">", _ATTRS runs exactly to it (only a quoted
    # value can hold ">"): the cheap forms first, _ATTRS for tags with quotes.
    f"""(?:>|[^>"']*+>|{_ATTRS}>)"""
    "|!--(?:-?>|.*?--!?>)"
    f"|{_RAW_COMPLETE}"
    "|!(?!--)[^>]*+>|\\?[^>]*+>|/(?![A-Za-z])[^>]*+>"
    f"|(?P<stop>!--|(?:{_RAW_NAMES}){_END}{_ATTRS}>|[!?/A-Za-z]|\\Z)"
    ")",
    re.IGNORECASE | re.ASCII | re.DOTALL,
)
_FAST_STRIDE = 3  # text, tag, stop
assert all(n[0] in "ns" for n in RAW_TEXT_SKIPPED)  # the start-tag shortcut in _FAST


def _ascii_case_variants(name: str) -> list[str]:
    """Every spelling of ``name`` in ASCII upper and lower case (``Div``, ``dIV``...)."""
    return ["".join(p) for p in product(*(sorted({c, c.upper()}) for c in name))]


_SEP_OF = dict.fromkeys(
    (v for n in BLOCK_ELEMENTS for v in _ascii_case_variants(n) + _ascii_case_variants("/" + n)),
    "\x00").get
"""Name token, in any ASCII case -> "\x00" (block: ends the run); other markup gets the
inline separator given as default ("\x01", or "" in a chunk without "&"). Holding every
case spelling (13k keys) spares lower-casing the tokens; ASCII case is all the tag
regexes fold, and the only non-ASCII character that ``str.lower`` makes ASCII
(``_FOLDS_TO_ASCII``) sends its chunk to the reference splitter."""
_FOLDS_TO_ASCII = "\u212a"
"""The only non-ASCII character whose ``str.lower`` is ASCII (KELVIN SIGN -> "k"); the
regex folds ASCII only, so a chunk holding it takes the reference splitter."""
_ENTITY_TAIL = re.compile(r"&#?[0-9A-Za-z]*\Z")
_TAG_NAME = re.compile(f"</?([^{_WS}/>]*)")
_COMMENT_END = re.compile(r"--!?>")
_RAW_END = {n: re.compile(f"</{n}(?=[{_WS}/>])[^>]*>|</{n}(?:[{_WS}/][^>]{{0,1024}})?\\Z",
                          re.IGNORECASE | re.ASCII) for n in RAW_TEXT_SKIPPED}

type Piece = str | None


class HtmlText:
    """Incremental HTML -> text runs; same output however the input ``str`` is split.

    ``feed_text``/``finish_text`` give the runs as one string with ``"\x00"`` where a run
    ends (what the Engine scans: no list of pieces to build and join again);
    ``feed``/``finish`` give the same as pieces (``None`` for a break)."""

    def __init__(self) -> None:
        self._carry = ""
        self._carry_is_tag = False  # the carry is an unfinished tag (needs a ">")
        self._waiting: list[str] = []  # input appended to an unfinished tag, not yet joined
        self._waiting_len = 0
        self._state = "data"  # or "comment" or one of RAW_TEXT_SKIPPED
        self._in_run = False  # text emitted since the last break
        self.forced_tags = 0
        """How many unfinished tags were ended at their first '>' (see ``_force_tag_end``)."""

    @classmethod
    def resume(cls, carry: str, carry_is_tag: bool, state: str, in_run: bool) -> HtmlText:
        """A reader continuing where another left off (the compiled scanner,
        rules/htmlscan.py, hands its state over when it meets input it leaves to this one)."""
        reader = cls()
        if state != "data" and state != "comment" and state not in RAW_TEXT_SKIPPED:
            raise ValueError(f"unknown HTML reader state {state!r}")
        reader._carry, reader._carry_is_tag = carry, carry_is_tag
        reader._state, reader._in_run = state, in_run
        return reader

    def feed(self, text: str) -> list[Piece]:
        return _pieces(self.feed_text(text))

    def finish(self) -> list[Piece]:
        return _pieces(self.finish_text())

    def feed_text(self, text: str) -> str:
        if self._carry_is_tag and ">" not in text:
            # An unfinished tag cannot finish without ">": keep the piece, do not re-scan
            # (a list, so that a tag arriving a byte at a time costs linear time).
            self._waiting.append(text)
            self._waiting_len += len(text)
            if len(self._carry) + self._waiting_len > MAX_TAG_CHARS:
                return self._run("", final=False)
            return ""
        return self._run(text, final=False)

    def finish_text(self) -> str:
        out = self._run("", final=True)
        self._carry, self._carry_is_tag = "", False
        return out

    def _run(self, text: str, final: bool) -> str:
        data = "".join([self._carry, *self._waiting, text]) if self._carry or self._waiting \
            else text
        if "\x00" in data:
            data = data.replace("\x00", "")  # HTML 13.2.6.4.7: NUL in body is ignored
        self._carry, self._carry_is_tag = "", False
        self._waiting.clear()
        self._waiting_len = 0
        out: list[str] = []
        pos = 0
        while 0 <= pos < len(data):
            if self._state != "data":
                pos = self._skip(data, pos, final)
            else:
                pos = self._data(data, pos, final, out)
        return out[0] if len(out) == 1 else "".join(out)

    def _skip(self, data: str, pos: int, final: bool) -> int:
        """Inside a comment or a raw-text element: find its end, carry a short tail."""
        if self._state == "comment":
            found = _COMMENT_END.search(data, pos)
            if found is None:
                self._carry = "" if final else data[max(pos, len(data) - 3):]
                return -1
            self._state = "data"
            return found.end()
        found = _RAW_END[self._state].search(data, pos)
        if found is None or not found.group().endswith(">"):
            tail = len(self._state) + 3
            start = found.start() if found is not None else max(pos, len(data) - tail)
            self._carry = "" if final else data[start:]
            return -1
        self._state = "data"
        return found.end()

    def _data(self, data: str, pos: int, final: bool, out: list[str]) -> int:
        """Split markup from text in C; returns where to continue, or -1 when done."""
        chunk = data[pos:] if pos else data
        if _FOLDS_TO_ASCII in chunk:
            return self._data_reference(data, pos, final, out)
        parts = _FAST.split(chunk)
        stops = parts[_FAST_STRIDE - 1::_FAST_STRIDE]
        index = len(stops)
        if stops.count(None) != index:
            index = next(i for i, s in enumerate(stops) if s is not None)
            if index != len(stops) - 1:
                # Markup after the stop was split too; where the stop is is not known
                # without the lengths of the matches: the reference splitter says.
                return self._data_reference(data, pos, final, out)
        stop = None
        if index < len(stops):  # the stop is the last match: drop it and the text after
            stop = stops[index]
            # Only the text after the stop follows it ("<" + stop was matched).
            at = len(data) - len(parts[-1]) - 1 - len(stop)
            del parts[-3:]
        # Name token of each removed markup (None: a comment or a raw-text element) ->
        # "\x00" for a block element, else "\x01", by a C-level map (no bytecode per tag).
        tags = parts[1::_FAST_STRIDE]
        # In place: text, separator, text ... (the stop slots, all None, removed). The
        # inline separator only keeps references from spanning removed markup: with no
        # "&" it can be "" (then no "\x01" to remove, unless the input had one).
        inline = "\x01" if "&" in chunk or "\x01" in chunk else ""
        parts[1::_FAST_STRIDE] = map(_SEP_OF, tags, repeat(inline))
        del parts[2::_FAST_STRIDE]
        if stop is None:
            last = parts[-1]
            tail = _ENTITY_TAIL.search(last) if not final and "&" in last else None
            if tail is not None and len(tail.group()) < ENTITY_TAIL_CHARS:
                parts[-1] = last[:tail.start()]
                self._carry = tail.group()
            self._emit_joined(parts, out)
            return -1
        self._emit_joined(parts, out)
        return self._at_stop(data, at, stop, final, out)

    def _data_reference(self, data: str, pos: int, final: bool, out: list[str]) -> int:
        """``_data`` by the reference splitter (whole-match group, block-name trie)."""
        parts = _MARKUP.split(data[pos:] if pos else data)
        stops = parts[_STRIDE - 1::_STRIDE]
        index = len(stops)
        if stops.count(None) != index:
            index = next(i for i, s in enumerate(stops) if s is not None)
        texts = parts[0:_STRIDE * index + 1:_STRIDE]
        seps = ["\x01" if brk is None else "\x00" for brk in parts[2:_STRIDE * index:_STRIDE]]
        if index == len(stops):
            tail = _ENTITY_TAIL.search(texts[-1]) if not final else None
            if tail is not None and len(tail.group()) < ENTITY_TAIL_CHARS:
                texts[-1] = texts[-1][:tail.start()]
                self._carry = tail.group()
            self._emit(texts, seps, out)
            return -1
        self._emit(texts, seps, out)
        at = pos + sum(map(len, texts)) + sum(map(len, parts[1:_STRIDE * index:_STRIDE]))
        stop = stops[index]
        return self._at_stop(data, at, stop, final, out)

    def _at_stop(self, data: str, at: int, stop: str, final: bool, out: list[str]) -> int:
        if stop == "!--":
            if len(data) - at < 6 and not final:
                # "<!-->" and "<!--->" close at once (13.2.5.43-44): wait for two more chars.
                self._carry = data[at:]
                return -1
            self._state = "comment"
            return at + 4
        if stop.endswith(">"):  # a raw-text start tag whose end is not here yet
            self._state = _TAG_NAME.match("<" + stop).group(1).lower()  # type: ignore[union-attr]
            return at + 1 + len(stop)
        if final and stop == "":  # "<" at the end of input is text (13.2.5.6)
            self._runs("<", out)
            return -1
        rest = data[at:]
        if final or len(rest) > MAX_TAG_CHARS:
            return self._force_tag_end(data, at, out)
        self._carry, self._carry_is_tag = rest, stop != ""
        return -1

    def _force_tag_end(self, data: str, at: int, out: list[str]) -> int:
        """Best effort for a tag that cannot finish (over-long, malformed, or cut by the end
        of input): end it at its first '>'. A browser would drop an unterminated tag with
        everything after it; scanning the rest instead can only add text, never hide it."""
        self.forced_tags += 1
        gt = data.find(">", at)
        if gt >= 0:
            name = _TAG_NAME.match(data, at)
            if name is not None and name.group(1).lower() in BLOCK_ELEMENTS:
                self._break(out)
            return gt + 1
        if at + TAG_KEEP_CHARS < len(data):
            self._carry, self._carry_is_tag = data[at:at + TAG_KEEP_CHARS], True
        else:
            self._carry, self._carry_is_tag = data[at:], True
        return -1

    def _break(self, out: list[str]) -> None:
        if self._in_run:
            out.append("\x00")
            self._in_run = False

    def _emit(self, texts: list[str], seps: list[str], out: list[str]) -> None:
        """Join the text pieces of one split and cut them into runs, all in C.

        Pieces are joined with U+0001 where a tag was removed and U+0000 where a block tag
        ended the run (``seps``; neither can be in the text: NUL was dropped and U+0001 is
        removed here). Character references are decoded once over the joined text; they
        cannot run across a separator because no reference contains either character."""
        if len(texts) == 1:
            self._emit_joined(texts, out)
        else:
            parts = [""] * (2 * len(texts) - 1)
            parts[0::2] = texts
            parts[1::2] = seps
            self._emit_joined(parts, out)

    def _emit_joined(self, parts: list[str], out: list[str]) -> None:
        """``_emit`` of the pieces already joined with their separators (in ``parts``)."""
        joined = parts[0] if len(parts) == 1 else "".join(parts)
        if "&" in joined:
            # HTML 13.2.5.72-80 character reference states, as html.unescape implements
            # them (numeric, named with the longest-prefix rule, legacy names without ";").
            joined = html.unescape(joined)
        if "\x01" in joined:
            joined = joined.replace("\x01", "")
        self._runs(joined, out)

    def _runs(self, joined: str, out: list[str]) -> None:
        """Text whose "\x00"s end runs; the part before the first continues the current run.

        A break is kept only after text (``_in_run``), and runs holding only whitespace
        between two breaks are folded away: they can never hold a keyword."""
        if "\x00" not in joined:
            if joined:
                out.append(joined)
                self._in_run = True
            return
        runs = joined.split("\x00")
        if len(runs) > 2:
            # Middle runs that are empty or whitespace (str.strip and re's \s agree) go,
            # as re.sub of \x00(?:\s*\x00)+ would fold them, without a regex stop
            # at every break.
            middle = runs[1:-1]
            kept = list(filter(str.strip, middle))
            if len(kept) != len(middle):
                joined = "\x00".join([runs[0], *kept, runs[-1]])
        in_run, self._in_run = self._in_run, not joined.endswith("\x00")
        if not in_run and joined[0] == "\x00":
            joined = joined[1:]
        if joined:
            out.append(joined)


def _pieces(joined: str) -> list[Piece]:
    """Runs as a string with "\x00" breaks -> pieces (a ``str`` per run, ``None`` per break)."""
    if not joined:
        return []
    out: list[Piece] = []
    for i, run in enumerate(joined.split("\x00")):
        if i:
            out.append(None)
        if run:
            out.append(run)
    return out
