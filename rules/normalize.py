"""Content normalisation: the text a keyword is matched against.

Owns the one definition of "the same text" used for keywords (at compile time)
and for scanned text (on the data path). Must not do I/O on the data path: the
tables are built once, in memory, on first use (about 1.4 s, see ``_build``).

What ``normalize`` does (the corpus README, "Normalisation within one text run"):

1. NFKC (UAX #15): full-width letters, digits and symbols become ASCII, compatibility
   ideographs become unified ones, ligatures split.
2. Full case folding (``str.casefold``), so ``ＧＨＢ``, ``GHB`` and ``ghb`` are one text.
3. Traditional → simplified Chinese at the character level, from OpenCC's ``t2s``
   conversion (its character dictionaries; phrases are not used, since a keyword may
   start or end in the middle of a phrase). ``代開發票`` becomes ``代开发票``.
4. Ignorable characters are dropped (``IGNORABLE``): Unicode whitespace (``str.isspace``:
   U+0009–U+000D, U+001C–U+001F, U+0020, U+0085, U+00A0, U+1680, U+2000–U+200A,
   U+2028, U+2029, U+202F, U+205F, U+3000), invisible format characters (U+00AD soft
   hyphen, U+034F, U+180E, U+200B–U+200F, U+202A–U+202E, U+2060–U+2064, U+2066–U+206F,
   U+FEFF, variation selectors U+FE00–U+FE0F and U+E0100–U+E01EF, tag characters
   U+E0001 and U+E0020–U+E007F, Hangul fillers U+115F U+1160 U+3164 U+FFA0) and the
   separator symbols ``* - _ . | / \\ ~ + # @ ^ = · •`` plus their look-alikes U+2010
   hyphen, U+2027 hyphenation point, U+2212 minus, U+2219 bullet operator, U+22C5 dot
   operator and U+30FB katakana middle dot (full-width forms reach these through NFKC).
   Sentence punctuation (``，。、；：！？``, quotes, brackets, the em dash ``—``) is kept:
   ``菠菜，网站`` must not match ``菠菜网站``. (The ellipsis ``…`` is NFKC ``...`` and so is
   ignorable, as the spec's order of steps implies.) Lone surrogates become U+FFFD.

Steps 1–4 are repeated until the text no longer changes (at most ``_MAX_PASSES``;
two passes suffice for every code point), so ``normalize`` is idempotent.

Speed strategy: a per-character Python loop, or ``str.translate`` with a dict, runs at
about 8 MB/s and ``unicodedata.normalize`` at about 13 MB/s on Chinese pages, while
almost every character of a page maps to itself. So (measured in the report of this
module's author, on 20 MB of mixed Chinese/ASCII page text: 80–85 MB/s on an idle
2-core machine):

* pure ASCII text: one ``str.translate`` (CPython's ASCII fast path);
* otherwise ``bytes.translate`` over the UTF-8 lower-cases ASCII and drops ASCII
  separators in one C pass. Then the non-ASCII characters that change: a page holds
  few distinct ones (``，`` and ``：`` on every line of Chinese text), so a Hyperscan
  block scan of the UTF-8 against all ~14k of them, each reported once
  (``HS_FLAG_SINGLEMATCH``), says which, and one ``str.replace`` each maps them: about
  twice as fast as ``sre``, which checks its class at 6-8 ns per character. With more
  than a few distinct ones, without Hyperscan, or for short text, one ``re.split`` on
  that class (a bitmap in ``sre``) isolates them, to be replaced through
  ``map(dict.get, ...)``, again without bytecode per character (``_plain_split``);
* that per-character replacement is exact only for text without "complex" characters
  (combining marks, Hangul jamo: anything that composes or reorders with a neighbour
  under NFKC). Around each complex character, from the preceding starter to the next
  one, the reference path runs instead (``unicodedata.normalize`` + ``casefold`` +
  ``translate`` to a fixpoint); text dense with them (Thai, Devanagari) takes the
  reference path whole. Tests check fast == reference on the corpus and generated text.

The tables are built on first use (about 1.4 s on an idle machine, 36 MB peak: every
code point is pushed through NFKC and casefold once, in 64 Ki blocks, plus one OpenCC
pass over the CJK blocks, plus 0.4 s for the 1.8 MB Hyperscan database of the
characters that change); nothing is read from disk but OpenCC's own dictionaries.

Pieces: ``normalize(a) + normalize(b) == normalize(a + b)`` whenever ``b`` does not start
with a character that composes or reorders with the end of ``a`` (a combining mark,
a Hangul vowel/trailing jamo, or U+FF9E/U+FF9F). ``Normalizer`` gives the exact
equality for any split by holding back the tail of a piece that could still combine
with the next piece: nothing for text ending in a CJK ideograph or punctuation, the
last "starter" and its marks otherwise, never more than ``MAX_HOLDBACK`` characters
(UAX #15's stream-safe text format bounds a run of non-starters at 30).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from array import array
from dataclasses import dataclass
from itertools import compress
from operator import ne

from rules.hs import ThreadScratch, hyperscan as _hs

__all__ = [
    "IGNORABLE",
    "MAX_HOLDBACK",
    "SEPARATORS",
    "Normalizer",
    "normalize",
    "normalize_many",
    "normalize_reference",
]

SEPARATORS = "*-_.|/\\~+#@^=·•" + "\u2010\u2027\u2212\u2219\u22c5\u30fb"
"""Symbols people put between the characters of a keyword to break naive matching
(``六*合*彩``, ``六.合.彩``). The first 15 are the product spec (corpus README); the rest
are look-alikes of ``-`` and ``·`` that NFKC does not fold onto them."""

_FORMAT_CHARS = (
    "\u00ad\u034f\u180e\u115f\u1160\u3164\uffa0\ufeff"
    + "".join(map(chr, range(0x200B, 0x2010)))
    + "".join(map(chr, range(0x202A, 0x202F)))
    + "".join(map(chr, range(0x2060, 0x2065)))
    + "".join(map(chr, range(0x2066, 0x2070)))
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
    + "\U000e0001"
    + "".join(map(chr, range(0xE0020, 0xE0080)))
)

IGNORABLE = frozenset(
    [chr(c) for c in range(0x3100) if chr(c).isspace()]
    + ["\u3000"]
    + list(_FORMAT_CHARS)
    + list(SEPARATORS)
)
"""Characters dropped from text before matching (see the module docstring)."""

MAX_HOLDBACK = 32
"""Most characters ``Normalizer.feed`` keeps back for the next piece. A run of more
non-starters than this is not "stream-safe" text (UAX #15 section 13 caps it at 30);
past this bound the split may normalise differently from the whole (documented, and
harmless for matching: such a run is no keyword)."""

_MAX_PASSES = 4
"""Bound on the fixpoint loop of the reference path. NFKC and case folding do not
commute for a few characters (U+01F0 casefolds to j + U+030C, which NFKC composes
back); a pass of NFKC, casefold and translate reaches a fixpoint within two passes for
every code point (checked when the tables are built)."""


@dataclass(frozen=True, slots=True)
class _Tables:
    mapping: dict[str, str]
    """Character → its normalised form, for every character that changes, and every
    complex character (mapped to itself)."""
    complex_chars: frozenset[str]
    """Characters that compose or reorder with their neighbours under NFKC."""
    non_inert: frozenset[str]
    """Characters that something following them may compose or reorder with."""
    translate: dict[int, str | None]
    """``str.translate`` table of steps 3 and 4 (t2s and dropping), reference path."""
    ascii_table: dict[int, str | None]
    """``str.translate`` table for pure-ASCII text: lower-case and drop separators."""
    ascii_bytes: bytes
    """``bytes.translate`` table: ASCII upper → lower case."""
    ascii_delete: bytes
    """ASCII ignorables, deleted by ``bytes.translate``."""
    special_bmp: re.Pattern[str]
    """Splits at non-ASCII BMP characters that change or are complex (one capturing
    group around a class, which sre compiles to a bitmap)."""
    special_astral: frozenset[str]
    """Astral characters that change or are complex."""
    special_split: re.Pattern[str]
    """Like ``special_bmp``, plus every astral character (``_plain`` splits once)."""
    complex_rx: re.Pattern[str]
    """Finds a complex character."""
    ignorable: frozenset[str]
    """Characters whose normalised form is empty."""
    special_chars: tuple[str, ...]
    """Every non-ASCII character that changes or is complex; ``special_db`` pattern ids
    index it."""
    special_db: object | None
    """Hyperscan block database of ``special_chars`` in UTF-8 (None without
    Hyperscan): finds which of them a text holds in one C pass (``_specials_in``)."""
    special_scratch: ThreadScratch | None
    """``special_db``'s scratch space, per thread."""


_tables: _Tables | None = None
_tables_lock = threading.Lock()


def _t2s_map() -> dict[int, str]:
    """Traditional → simplified, one character at a time, through OpenCC ``t2s``.

    Each character is converted alone (joined by newlines, which no dictionary phrase
    spans), so the map is OpenCC's character-level answer; multi-character outputs are
    not used. Converting the 104k CJK code points takes about 50 ms.
    """
    import opencc  # a dependency of the product; imported only when tables are built

    ranges = ((0x2E80, 0xA000), (0xF900, 0xFB00), (0x20000, 0x323B0))
    chars = [chr(c) for lo, hi in ranges for c in range(lo, hi)]
    out = opencc.OpenCC("t2s").convert("\n".join(chars)).split("\n")
    if len(out) != len(chars):  # pragma: no cover - OpenCC contract
        raise RuntimeError("OpenCC t2s changed the number of lines")
    table = {ord(a): b for a, b in zip(chars, out) if a != b and len(b) == 1}
    # Chains (薴 → 苧 → 苎): map to the end of the chain so one pass is enough.
    for k, v in list(table.items()):
        seen = 0
        while ord(v) in table and seen < 8:
            v = table[ord(v)]
            seen += 1
        table[k] = v
    return table


def _composition_sets() -> tuple[frozenset[str], frozenset[str]]:
    """(first, second) characters of the canonical compositions NFC performs."""
    first: set[str] = set()
    second: set[str] = set()
    for cp in range(0x30000):
        d = unicodedata.decomposition(chr(cp))
        if not d or d[0] == "<":
            continue
        parts = d.split()
        if len(parts) != 2:
            continue
        a, b = chr(int(parts[0], 16)), chr(int(parts[1], 16))
        if unicodedata.normalize("NFC", a + b) == chr(cp):
            first.add(a)
            second.add(b)
    # Hangul: L + V → LV, LV + T → LVT (algorithmic, not in the decomposition table).
    first.update(chr(c) for c in range(0x1100, 0x1113))
    first.update(chr(c) for c in range(0xAC00, 0xD7A4, 28))
    second.update(chr(c) for c in range(0x1161, 0x1176))
    second.update(chr(c) for c in range(0x11A8, 0x11C3))
    return frozenset(first), frozenset(second)


def _char_class(chars: set[str] | frozenset[str]) -> str:
    """A regex character class, compressed into ranges (sre checks ranges linearly
    for astral characters, so fewer items is faster)."""
    cps = sorted(map(ord, chars))
    parts: list[str] = []
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = chr(cps[i]), chr(cps[j])
        parts.append(re.escape(lo) if i == j else f"{re.escape(lo)}-{re.escape(hi)}")
        i = j + 1
    return "[" + "".join(parts) + "]" if parts else "[^\\s\\S]"


_MAX_COMBINING = 0x1FFFF
"""No character above this has a non-zero canonical combining class (Unicode 15:
the last is U+1E94A); tests/rules/test_normalize.py checks it over all code points."""


def _build() -> _Tables:
    translate: dict[int, str | None] = dict(_t2s_map())
    for c in IGNORABLE:
        translate[ord(c)] = None
    for cp in range(0xD800, 0xE000):
        translate[cp] = "\ufffd"

    def one_pass(s: str) -> str:
        return unicodedata.normalize("NFKC", s).casefold().translate(translate)

    # Bulk first pass over every code point: joined by "\n", which nothing composes
    # with and which no mapping produces ("\n" itself is ignorable, handled below).
    mapping: dict[str, str] = {"\n": ""}
    for lo in range(0, 0x110000, 0x10000):  # in blocks: bounded transient memory
        src = [chr(cp) for cp in range(lo, lo + 0x10000) if cp != 0x0A]
        first = unicodedata.normalize("NFKC", "\n".join(src)).casefold().split("\n")
        # The few characters that change, found by C-level iteration (no per-char bytecode).
        mapping.update(compress(zip(src, first), map(ne, src, first)))
    for cp in translate:
        c = chr(cp)
        mapping.setdefault(c, c)
    for c, out in mapping.items():
        out = out.translate(translate)
        for _ in range(_MAX_PASSES):
            nxt = one_pass(out)
            if nxt == out:
                break
            out = nxt
        else:  # pragma: no cover - Unicode data contract, checked at build
            raise RuntimeError(f"normalisation of U+{ord(c):04X} does not converge")
        mapping[c] = out
    mapping = {c: out for c, out in mapping.items() if out != c}

    comp_first, comp_second = _composition_sets()
    complex_chars = {
        c for c in map(chr, range(_MAX_COMBINING + 1)) if unicodedata.combining(c)
    } | set(comp_second)
    for c, out in mapping.items():
        if out and (unicodedata.combining(out[0]) or out[0] in comp_second):
            complex_chars.add(c)
    for c in complex_chars:
        mapping.setdefault(c, c)

    # Inert: nothing that follows can compose or reorder with it.
    def inert(c: str) -> bool:
        if c in complex_chars or c in comp_first:
            return False
        out = mapping.get(c, c)
        if not out:
            return False
        last = out[-1]
        return not (
            unicodedata.combining(last) or last in comp_first or last in comp_second
        )

    non_inert = {c for c in mapping if not inert(c)} | set(comp_first)
    ascii_table: dict[int, str | None] = {
        ord(c): (out if out else None) for c, out in mapping.items() if ord(c) < 128
    }
    special = {c for c in mapping if ord(c) >= 0x80}
    bmp = {c for c in special if ord(c) < 0x10000}
    ignorable = {c for c, out in mapping.items() if out == ""}
    cx_bmp = _char_class({c for c in complex_chars if ord(c) < 0x10000})
    cx_astral = _char_class({c for c in complex_chars if ord(c) >= 0x10000})
    cx = f"(?:{cx_bmp}|(?=[\U00010000-\U0010ffff]){cx_astral})"
    lower = bytes(range(256)).translate(bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                                                        b"abcdefghijklmnopqrstuvwxyz"))
    delete = bytes(sorted(ord(c) for c in ignorable if ord(c) < 0x80))
    # _plain replaces specials one after another: that equals the per-character map
    # only if no replacement holds a character that changes again.
    if any(mapping.get(d, d) != d for out in mapping.values() for d in out):  # pragma: no cover
        raise RuntimeError("a normalised form holds a character that changes")
    special_chars = tuple(sorted(special))
    special_db = _special_db(special_chars)
    return _Tables(
        special_chars=special_chars,
        special_db=special_db,
        special_scratch=None if special_db is None else ThreadScratch(special_db),
        ascii_bytes=lower,
        ascii_delete=delete,
        complex_rx=re.compile(cx),
        ignorable=frozenset(ignorable),
        mapping=mapping,
        complex_chars=frozenset(complex_chars),
        non_inert=frozenset(non_inert),
        translate=translate,
        ascii_table=ascii_table,
        special_bmp=re.compile("(" + _char_class(bmp) + ")"),
        special_astral=frozenset(special - bmp),
        special_split=re.compile("(" + _char_class(bmp)[:-1] + "\U00010000-\U0010ffff])"),
    )


def _special_db(chars: tuple[str, ...]) -> object | None:
    """Hyperscan literals of ``chars`` (UTF-8, each reported once per scan): about
    0.4 s and 2 MB for the ~14k characters."""
    if _hs is None:  # pragma: no cover - hyperscan is a dependency on x86-64
        return None
    db = _hs.Database(mode=_hs.HS_MODE_BLOCK)
    db.compile(expressions=[c.encode("utf-8", "surrogatepass") for c in chars],
               ids=list(range(len(chars))), elements=len(chars),
               flags=[_hs.HS_FLAG_SINGLEMATCH] * len(chars), literal=True)
    return db


def _get_tables() -> _Tables:
    global _tables
    if _tables is None:
        with _tables_lock:
            if _tables is None:
                _tables = _build()
    return _tables


def normalize_reference(text: str) -> str:
    """The definition: NFKC, casefold, t2s and dropping, repeated to a fixpoint.

    Correct for any text, about 8 MB/s; ``normalize`` gives the same result faster.
    """
    t = _get_tables()
    for _ in range(_MAX_PASSES):
        nxt = unicodedata.normalize("NFKC", text).casefold().translate(t.translate)
        if nxt == text:
            break
        text = nxt
    return text


def normalize(text: str) -> str:
    """Normalise ``text`` for matching (see the module docstring). Never raises."""
    t = _get_tables()
    if text.isascii():
        return text.translate(t.ascii_table)
    out = _plain(text, t)
    return out if out is not None else _with_clusters(text, t)


def _plain(text: str, t: _Tables) -> str | None:
    """Per-character mapping; None when ``text`` holds a complex character.

    ASCII is lower-cased and its separators dropped by one ``bytes.translate`` over
    the UTF-8 (a C pass). The non-ASCII characters that change are then found by
    Hyperscan when it is installed and the text is long (``_specials_in``: one C pass
    at several hundred MB/s that reports each distinct one once) and replaced with
    one ``str.replace`` each; otherwise, or when more than ``MAX_REPLACED_SPECIALS``
    distinct ones occur, by ``_plain_split``.
    """
    data = text.encode("utf-8", "surrogatepass").translate(t.ascii_bytes, t.ascii_delete)
    found = _specials_in(data, t) if len(data) >= SPECIAL_SCAN_MIN_BYTES else None
    s = data.decode("utf-8", "surrogatepass")
    if found is None:
        return _plain_split(s, t)
    if not t.complex_chars.isdisjoint(found):
        return None
    # Sequential replacement equals the per-character map: no replacement contains a
    # character that changes (checked when the tables are built).
    for c in found:
        s = s.replace(c, t.mapping[c])
    return s


def _plain_split(s: str, t: _Tables) -> str | None:
    """``_plain`` after the ASCII pass, by one ``re.split``: the reference fast path,
    and the one used without Hyperscan or for text with many distinct specials.

    The split (on a class that sre checks per character, ~6-8 ns each) cuts the text
    at each non-ASCII character that changes and at astral characters (rare: CJK
    extension B and later), and ``map(dict.get)`` replaces them, with no Python-level
    loop per character.
    """
    # One split isolates the BMP characters that change and every astral character (a
    # separate search for astral ones was a second pass over the text); astral ones
    # that do not change map to themselves.
    parts = t.special_split.split(s)
    if len(parts) > 1:
        specials = parts[1::2]
        if not t.complex_chars.isdisjoint(specials):
            return None
        parts[1::2] = map(t.mapping.get, specials, specials)
        s = "".join(parts)
    return s


MAX_REPLACED_SPECIALS = 8
"""Distinct changing characters replaced one ``str.replace`` (a C pass) each; with
more (traditional Chinese, full-width text), one ``re.split`` costs less."""

SPECIAL_SCAN_MIN_BYTES = 512
"""Below this, one ``re.split`` costs less than a Hyperscan call (keywords, short
form values)."""

def _note_special(pid: int, start: int, end: int, flags: int, found: list[int]) -> bool:
    """Hyperscan callback (module level: the binding keeps no reference to it); stops
    the scan once there are too many to replace one by one."""
    found.append(pid)
    return len(found) > MAX_REPLACED_SPECIALS


def _specials_in(data: bytes, t: _Tables) -> list[str] | None:
    """The distinct non-ASCII characters that change in UTF-8 ``data``, or None when
    Hyperscan is missing or there are more than ``MAX_REPLACED_SPECIALS``.

    UTF-8 is self-synchronising, so a character's bytes match only at its own
    position; ``HS_FLAG_SINGLEMATCH`` reports each character once per scan."""
    db = t.special_db
    if db is None or t.special_scratch is None:
        return None
    found: list[int] = []
    try:
        db.scan(data, match_event_handler=_note_special, context=found, scratch=t.special_scratch.get())
    except _hs.ScanTerminated:
        return None
    return [t.special_chars[i] for i in found]


_CLUSTERS_PER_CHAR_SLOW = 1 / 64
"""Above this density of complex clusters (Thai, Devanagari, Vietnamese written
decomposed), one reference pass over the whole text is cheaper than many pieces."""


def _with_clusters(text: str, t: _Tables) -> str:
    """Reference normalisation for each complex cluster, the fast path between them.

    A cluster is a run of complex and ignorable characters plus the starter before
    it (a character that is neither), which is an NFKC boundary; the character after
    the run is another boundary, so the pieces normalise independently.
    """
    cx, ign, n = t.complex_chars, t.ignorable, len(text)
    spans: list[tuple[int, int]] = []
    for m in t.complex_rx.finditer(text):
        i = m.start()
        if spans and i < spans[-1][1]:
            continue
        start = i
        while start > 0 and (text[start - 1] in cx or text[start - 1] in ign):
            start -= 1
        start = max(start - 1, spans[-1][1] if spans else 0)
        end = i + 1
        while end < n and (text[end] in cx or text[end] in ign):
            end += 1
        spans.append((start, end))
        if len(spans) > max(4, n * _CLUSTERS_PER_CHAR_SLOW):
            return normalize_reference(text)
    out: list[str] = []
    pos = 0
    for start, end in spans:
        if start > pos:
            out.append(_piece(text[pos:start], t))
        out.append(normalize_reference(text[start:end]))
        pos = end
    if pos < n:
        out.append(_piece(text[pos:], t))
    return "".join(out)


def _piece(text: str, t: _Tables) -> str:
    """A piece between clusters (has no complex character, unless it is an astral
    one the cluster pattern did not see; then the reference path is taken)."""
    if text.isascii():
        return text.translate(t.ascii_table)
    out = _plain(text, t)
    return out if out is not None else normalize_reference(text)


_BATCH_CHARS = 1 << 20
"""Characters normalised per call by ``normalize_many``."""


def normalize_many(texts: list[str]) -> list[str]:
    """``[normalize(t) for t in texts]``, faster for many short texts (keywords).

    Joins them with NUL, which normalisation keeps and never combines with a
    neighbour (a starter that composes with nothing), then splits the result.
    Texts that contain NUL themselves are normalised one by one.
    """
    out: list[str] = []
    batch: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if batch:
            parts = normalize("\x00".join(batch)).split("\x00")
            if len(parts) != len(batch):  # pragma: no cover - guarded by the NUL check
                parts = [normalize(b) for b in batch]
            out.extend(parts)
            batch.clear()
            size = 0

    for t in texts:
        if "\x00" in t:
            flush()
            out.append(normalize(t))
            continue
        batch.append(t)
        size += len(t) + 1
        if size >= _BATCH_CHARS:
            flush()
    flush()
    return out


SCAN_CHANGES, SCAN_COMPLEX, SCAN_NON_INERT, SCAN_IGNORABLE = 0x01, 0x02, 0x04, 0x08
"""Flags of ``scan_tables`` entries (rules/_htmlscan.c reads them)."""


def scan_tables() -> tuple[bytes, bytes, bytes]:
    """These tables packed for the compiled scanner (rules/_htmlscan.c): ``(top, blocks,
    repl)``. ``top`` maps ``cp >> 8`` to a block (uint16; block 0 is all zero: nothing
    changes, inert); a block is 256 uint32 entries ``flags << 24 | offset``, ``flags``
    the ``SCAN_*`` bits, ``offset`` into ``repl`` where a length byte and the UTF-8
    replacement stand. The same ``mapping``, ``complex_chars`` and ``non_inert`` as the
    Python path: one definition of the normalised text."""
    t = _get_tables()
    entries: dict[int, int] = {}
    repl = bytearray(b"\0")
    for c, out in t.mapping.items():
        flags = SCAN_COMPLEX if c in t.complex_chars else 0
        if out == "":
            flags |= SCAN_IGNORABLE | SCAN_CHANGES
            entries[ord(c)] = flags << 24
        elif out != c:
            encoded = out.encode("utf-8", "surrogatepass")
            entries[ord(c)] = (flags | SCAN_CHANGES) << 24 | len(repl)
            repl += bytes((len(encoded),)) + encoded
        else:
            entries[ord(c)] = flags << 24
    for c in t.non_inert:
        entries[ord(c)] = entries.get(ord(c), 0) | SCAN_NON_INERT << 24
    top = [0] * (0x110000 >> 8)
    blocks = [[0] * 256]
    for cp, value in sorted(entries.items()):
        if value == 0:
            continue
        if top[cp >> 8] == 0:
            top[cp >> 8] = len(blocks)
            blocks.append([0] * 256)
        blocks[top[cp >> 8]][cp & 255] = value
    if len(blocks) >= 1 << 16 or len(repl) >= 1 << 24:  # pragma: no cover - table contract
        raise RuntimeError("normalisation tables too large for the compiled scanner")
    return (array("H", top).tobytes(), array("I", [v for b in blocks for v in b]).tobytes(),
            bytes(repl))


class Normalizer:
    """Normalises a text run given in pieces, exactly as if it were given whole.

    ``feed`` returns the normalised text that is final; a tail that could still combine
    with the next piece (at most ``MAX_HOLDBACK`` characters) is kept until the next
    ``feed`` or ``flush`` (call it at the end of the run). Not thread-safe: one per run.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text if self._held else text
        self._held = ""
        if not text:
            return ""
        cut = self._split_point(text)
        if cut < len(text):
            self._held = text[cut:]
            text = text[:cut]
        return normalize(text) if text else ""

    def flush(self) -> str:
        """The held-back tail, normalised; the Normalizer is then ready for a new run."""
        text, self._held = self._held, ""
        return normalize(text) if text else ""

    @staticmethod
    def _split_point(text: str) -> int:
        """Where to cut ``text``: everything before the cut is final."""
        t = _get_tables()
        n = len(text)
        # The last character that is not ignorable decides.
        j = n - 1
        while j >= 0 and j >= n - MAX_HOLDBACK and t.mapping.get(text[j], None) == "":
            j -= 1
        if j < 0 or j < n - MAX_HOLDBACK:
            return n  # only ignorables at the end: nothing can combine with them
        c = text[j]
        if c not in t.non_inert:
            return n  # an inert character ends the piece
        # Hold back from the last "starter" (a non-complex, non-ignorable character).
        for i in range(j, max(n - MAX_HOLDBACK, 0) - 1, -1):
            ch = text[i]
            if ch not in t.complex_chars and t.mapping.get(ch, ch) != "":
                return i
        # No starter in reach (a run that opens with marks): the marks may still reorder
        # with marks of the next piece (U+0300 then U+FF9E is U+3099 U+0300), so hold
        # them, up to the bound.
        return max(n - MAX_HOLDBACK, 0)
