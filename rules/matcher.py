"""Keyword matching: many literal keywords over normalised text, streamed.

Owns the keyword automaton and its two backends; must not normalise (the caller feeds
text already passed through rules/normalize.py), decode, or do I/O.

* ``hyperscan`` (PyPI ``hyperscan``): literal patterns (``hs_compile_lit_multi``) in
  streaming mode, over the UTF-8 bytes of the text. The stream keeps its own state, so
  a keyword split across ``feed`` calls is found without re-scanning an overlap.
* ``aho`` (PyPI ``pyahocorasick``): the portable reference backend. Its automaton is
  built over the UTF-8 bytes of each keyword decoded as latin-1, and the text is scanned
  the same way: a str automaton on CJK keywords crawls (its root has thousands of edges
  searched linearly: 0.5–0.9 MB/s measured here) while the byte-wise one has at most
  256 edges per node (25–37 MB/s). Streaming keeps the last (longest keyword − 1) bytes
  and re-scans them with the next piece, reporting only matches that end in it.
* ``auto``: hyperscan when importable, else aho.

Both report the same thing: every occurrence of every rule, as (rule index into
``matcher.rules``, end offset in characters from the start of the stream, exclusive),
sorted by (end, rule index). UTF-8 is self-synchronising, so a keyword's bytes can
only match at character boundaries; byte offsets are turned into character offsets by
counting the UTF-8 lead bytes before them, and only when there is a match.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from rules.normalize import normalize
from rules.ruleset import KeywordRule

__all__ = ["Backend", "KeywordMatcher", "KeywordStream", "available_backends"]

Backend = Literal["hyperscan", "aho", "auto"]

from rules.hs import ThreadScratch, hyperscan as _hs


def available_backends() -> list[str]:
    """Backends usable in this process (``aho`` always)."""
    return (["hyperscan"] if _hs is not None else []) + ["aho"]


def char_offsets(data: bytes, ends: Sequence[int]) -> list[int]:
    """Character offsets of sorted byte offsets ``ends`` into UTF-8 ``data``.

    Decodes each stretch between consecutive offsets once: O(len(data)) for all.
    """
    out: list[int] = []
    pos = 0
    chars = 0
    for e in ends:
        if e > pos:
            chars += len(data[pos:e].decode("utf-8", "surrogatepass"))
            pos = e
        out.append(chars)
    return out


def _collect(pid: int, start: int, end: int, flags: int, hits: list[tuple[int, int]]) -> None:
    """Hyperscan match callback. Module level, so it is always referenced: the binding
    keeps no reference to a stream's callback, and a collected one segfaults."""
    hits.append((end, pid))


class KeywordMatcher:
    """Compiled keywords; immutable and safe to share between threads.

    ``rules``: the rules, in the order given; ``patterns``: the normalised keyword of
    each (what is matched); ``backend``: the backend in use.
    """

    def __init__(self, rules: list[KeywordRule], backend: str) -> None:
        self.rules = rules
        self.patterns: list[str] = [r.normalized or _prepare(r) for r in rules]
        for r, p in zip(rules, self.patterns):
            if not p:
                raise ValueError(f"rule {r.id!r}: keyword {r.keyword!r} is empty after normalisation")
            if "\x00" in p:
                # Hyperscan's binding passes literals as C strings; the rule-set
                # validation refuses NUL too, so both backends refuse it alike.
                raise ValueError(f"rule {r.id!r}: keyword contains a NUL character")
        # Identical patterns share one automaton entry: pattern id → rule indices.
        ids: dict[str, int] = {}
        self._pattern_rules: list[tuple[int, ...]] = []
        self._unique: list[bytes] = []
        for i, p in enumerate(self.patterns):
            j = ids.get(p)
            if j is None:
                ids[p] = len(self._unique)
                self._unique.append(p.encode("utf-8", "surrogatepass"))
                self._pattern_rules.append((i,))
            else:
                self._pattern_rules[j] = (*self._pattern_rules[j], i)
        self.max_bytes = max((len(b) for b in self._unique), default=0)
        self.pattern_bytes = [len(self._unique[ids[p]]) for p in self.patterns]
        """UTF-8 length of each rule's pattern."""
        self.backend = backend
        self._hs_db = None
        self._aho = None
        self._hs_scratch: ThreadScratch | None = None
        if not self._unique:
            return
        if backend == "hyperscan":
            db = _hs.Database(mode=_hs.HS_MODE_STREAM)
            db.compile(expressions=self._unique, ids=list(range(len(self._unique))),
                       elements=len(self._unique), flags=0, literal=True)
            # The database's own scratch serves only stream closes: the binding's
            # Stream.close(scratch=...) fails its argument check (hyperscan 0.9.1), so
            # streams are closed without one and it falls back to this. Closes hold
            # the GIL (scans release it and use ThreadScratch), so two never share it.
            db.scratch = _hs.Scratch(db)
            self._hs_db = db
            self._hs_scratch = ThreadScratch(db)
        else:
            import ahocorasick

            a = ahocorasick.Automaton()
            for j, b in enumerate(self._unique):
                a.add_word(b.decode("latin-1"), (j, len(b)))
            a.make_automaton()
            self._aho = a

    @classmethod
    def compile(cls, rules: Iterable[KeywordRule], backend: Backend = "auto") -> KeywordMatcher:
        """Compile ``rules``. ``backend``: ``hyperscan``, ``aho`` or ``auto``."""
        if backend == "auto":
            backend = "hyperscan" if _hs is not None else "aho"
        if backend == "hyperscan" and _hs is None:
            raise ValueError("backend 'hyperscan' is not installed (pip install hyperscan)")
        if backend not in ("hyperscan", "aho"):
            raise ValueError(f"unknown backend {backend!r} (hyperscan, aho or auto)")
        return cls(list(rules), backend)

    def stream(self) -> KeywordStream:
        """A new stream (one per text run and thread; not thread-safe itself)."""
        if self._hs_db is not None:
            return _HsStream(self)
        return _AhoStream(self)

    def scan(self, normalized_text: str) -> list[tuple[int, int]]:
        """(rule index, end offset in characters) of every match in one text."""
        s = self.stream()
        try:
            return s.feed(normalized_text)
        finally:
            s.close()

    def _expand(self, raw: list[tuple[int, int]], data: bytes, base_bytes: int,
                base_chars: int) -> list[tuple[int, int]]:
        """(byte end, pattern id) → sorted (rule index, char end)."""
        if not raw:
            return []
        raw.sort()
        offs = char_offsets(data, [e - base_bytes for e, _ in raw])
        out: list[tuple[int, int]] = []
        for (_, pid), c in zip(raw, offs):
            end = base_chars + c
            for ri in self._pattern_rules[pid]:
                out.append((ri, end))
        out.sort(key=lambda m: (m[1], m[0]))
        return out

    def _expand_bytes(self, raw: list[tuple[int, int]], base_bytes: int) -> list[tuple[int, int]]:
        """(byte end, pattern id) → sorted (rule index, byte end - ``base_bytes``)."""
        raw.sort()
        out = [(ri, e - base_bytes) for e, pid in raw for ri in self._pattern_rules[pid]]
        out.sort(key=lambda m: (m[1], m[0]))
        return out

    def _scratch(self):  # noqa: ANN202 - hyperscan.Scratch
        """This thread's Hyperscan scratch space (``rules.hs.ThreadScratch``)."""
        return self._hs_scratch.get()  # type: ignore[union-attr]


def _prepare(rule: KeywordRule) -> str:
    return rule.keyword if "exact" in rule.flags else normalize(rule.keyword)


class KeywordStream:
    """Matches over one text run fed in pieces. ``feed`` returns the matches that end
    in the piece; ``reset`` starts a new run (offsets restart at 0)."""

    _m: KeywordMatcher
    _bytes: int
    _chars: int

    def feed(self, normalized_text: str) -> list[tuple[int, int]]:
        """(rule index, end offset in characters from the stream's start) of each match."""
        return self.feed_utf8(normalized_text.encode("utf-8", "surrogatepass"),
                              len(normalized_text))

    def feed_utf8(self, data: bytes, chars: int) -> list[tuple[int, int]]:
        """``feed`` of normalised text given as UTF-8 (``chars`` characters long)."""
        base_b, base_c = self._bytes, self._chars
        raw = self._raw(data, chars)
        return self._m._expand(raw, data, base_b, base_c) if raw else []

    def feed_utf8_ends(self, data: bytes, chars: int) -> list[tuple[int, int]]:
        """``feed_utf8``, each match's end given as a byte offset into ``data`` (no
        character counting: the caller decodes only what it needs)."""
        base_b = self._bytes
        raw = self._raw(data, chars)
        return self._m._expand_bytes(raw, base_b) if raw else []

    def _raw(self, data: bytes, chars: int) -> list[tuple[int, int]]:
        """(byte end from the stream's start, pattern id) of the matches ending in ``data``."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free backend resources (also done when the stream is collected)."""

    def __enter__(self) -> KeywordStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HsStream(KeywordStream):
    __slots__ = ("_m", "_stream", "_hits", "_bytes", "_chars")

    def __init__(self, matcher: KeywordMatcher) -> None:
        self._m = matcher
        self._hits: list[tuple[int, int]] = []
        self._stream = None
        self._bytes = 0
        self._chars = 0

    def _open(self):  # noqa: ANN202
        # db.stream() returns an extra reference that Stream.__enter__ (which opens
        # the Hyperscan stream and returns a borrowed self) balances: call both, once.
        st = self._m._hs_db.stream(match_event_handler=_collect, context=self._hits)  # type: ignore[union-attr]
        st.__enter__()
        self._stream = st
        return st

    def _raw(self, data: bytes, chars: int) -> list[tuple[int, int]]:
        if not data:
            return []
        st = self._stream or self._open()
        hits = self._hits
        st.scan(data, scratch=self._m._scratch(), match_event_handler=_collect, context=hits)
        self._bytes += len(data)
        self._chars += chars
        if not hits:
            return []
        raw = hits[:]
        hits.clear()
        return raw

    def reset(self) -> None:
        self.close()
        self._bytes = self._chars = 0

    def close(self) -> None:
        st, self._stream = self._stream, None
        if st is not None:
            try:  # frees the stream's state (see KeywordMatcher.__init__ on the scratch)
                st.close(match_event_handler=_collect, context=self._hits)
            except Exception:  # noqa: BLE001 - literals report nothing at close; at
                pass  # interpreter exit the scratch may be gone: the OS frees the stream
            self._hits.clear()

    def __del__(self) -> None:
        self.close()


class _AhoStream(KeywordStream):
    __slots__ = ("_m", "_tail", "_bytes", "_chars")

    def __init__(self, matcher: KeywordMatcher) -> None:
        self._m = matcher
        self._tail = b""
        self._bytes = 0
        self._chars = 0

    def _raw(self, data: bytes, chars: int) -> list[tuple[int, int]]:
        m = self._m
        base_b = self._bytes
        self._bytes += len(data)
        self._chars += chars
        if not data or m._aho is None:
            return []
        tail = self._tail
        buf = tail + data if tail else data
        keep = m.max_bytes - 1
        self._tail = buf[-keep:] if keep > 0 else b""
        lt = len(tail)
        # iter() yields the index of the last character of each match, inclusive.
        return [(base_b + (end + 1 - lt), pid)
                for end, (pid, _n) in m._aho.iter(buf.decode("latin-1"))
                if end >= lt]

    def reset(self) -> None:
        self._tail = b""
        self._bytes = self._chars = 0
