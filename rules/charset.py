"""Charsets: choose how a body's bytes become text, as a browser would, and decode them
incrementally.

Owns: WHATWG encoding labels -> Python codecs, the BOM / Content-Type / ``<meta>`` / sniff
order of corpus/README.md "How labels were decided" step 3, the bounded sniff buffer and
the incremental decoder that applies the choice.

Must not: raise on undecodable input (it recovers and records an error string), hold
more than ``sniff_bytes`` of input (or the 1024 bytes a ``<meta>`` may need, if more), or
know about content codings or containers.

Order (first that applies wins):
1. a byte order mark (UTF-8, UTF-16LE, UTF-16BE) - WHATWG "decode": "BOM sniffing wins";
2. the ``charset`` of Content-Type (the caller passes it as ``declared``);
3. for HTML only, ``<meta charset>`` or ``<meta http-equiv="Content-Type">`` in the first
   1024 bytes (WHATWG "prescan a byte stream", approximated with a regex);
4. otherwise sniff: valid UTF-8 -> UTF-8, else GB18030.
gb2312, gbk and friends decode as GB18030 (WHATWG maps them to GBK, whose decoder *is*
the GB18030 decoder); big5 decodes as Big5-HKSCS (WHATWG's Big5 is the HKSCS superset).
An unknown label is ignored (sniff). A declared charset that fails to decode the sniff
window is replaced by the sniffed one. Invalid bytes after the choice become U+FFFD and
an error is recorded.
"""

from __future__ import annotations

import codecs
import re

SNIFF_BYTES = 16 * 1024
"""Bytes held back, from the first non-ASCII byte on, to check a declared charset or
sniff an undeclared one (ASCII before it is produced at once: it reads the same in every
candidate). GBK text stops being valid UTF-8 within a few characters; 16 KiB makes a
wrong guess on real text practically impossible while bounding what one body holds."""

META_PRESCAN_BYTES = 1024
"""WHATWG HTML 13.2.3.2: the prescan looks at the first 1024 bytes."""

_LABELS: dict[str, str] = {}
for _codec, _names in {
    "utf-8": "unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8",
    "gb18030": "chinese csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 "
               "x-gbk gb18030 cp936 windows-936 euc-cn",
    "big5hkscs": "big5 big5-hkscs cn-big5 csbig5 x-x-big5 cp950",
    "utf-16-le": "csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff utf-16 utf-16le",
    "utf-16-be": "unicodefffe utf-16be",
    "cp1252": "ansi_x3.4-1968 ascii cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 "
              "iso8859-1 iso88591 iso_8859-1 iso_8859-1:1987 l1 latin1 us-ascii windows-1252 "
              "x-cp1252",
    "cp932": "csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis",
    "cp949": "cseuckr csksc56011987 euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 "
             "ksc5601 ksc_5601 windows-949",
    "euc_jp": "cseucpkdfmtjapanese euc-jp x-euc-jp",
    "iso2022_jp": "csiso2022jp iso-2022-jp",
}.items():
    _LABELS.update(dict.fromkeys(_names.split(), _codec))

_PYTHON_FALLBACK = frozenset(codecs.lookup(name).name for name in (
    ["koi8_r", "koi8_u", "cp866", "mac_cyrillic", "mac_roman", "cp874"]
    + [f"iso8859_{n}" for n in (2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)]
    + [f"cp{n}" for n in range(1250, 1259)]))
"""Other WHATWG single-byte encodings, accepted under any label Python knows them by."""

_META = re.compile(rb"<meta[^>]*?charset\s*=\s*[\"']?\s*([-\w.:]+)", re.IGNORECASE)
_XML_DECL = re.compile(rb"<\?xml[^>]*?encoding\s*=\s*[\"']([-\w.:]+)", re.IGNORECASE)
_COMMENT = re.compile(rb"<!--.*?(?:-->|$)", re.DOTALL)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))


_LOOKUP_CACHE: dict[str | bytes, str | None] = {}
LOOKUP_CACHE_SIZE = 1024
"""Labels remembered by ``lookup`` (a message asks up to three times, and real traffic
uses a handful of labels); bounded since labels come from the traffic."""


def lookup(label: str | bytes | None) -> str | None:
    """WHATWG encoding label -> Python codec name; None for unknown or unsafe labels."""
    if label is None:
        return None
    try:
        return _LOOKUP_CACHE[label]
    except KeyError:
        pass
    codec = _lookup(label)
    if len(_LOOKUP_CACHE) >= LOOKUP_CACHE_SIZE:
        _LOOKUP_CACHE.clear()
    _LOOKUP_CACHE[label] = codec
    return codec


def _lookup(label: str | bytes) -> str | None:
    if isinstance(label, bytes):
        label = label.decode("latin-1")
    label = label.strip().strip("\"'").strip().lower()
    if label in _LABELS:
        return _LABELS[label]
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError):
        return None
    return name if name in _PYTHON_FALLBACK else None


def bom(data: bytes) -> tuple[str, int] | None:
    """(codec, BOM length) if ``data`` starts with a byte order mark."""
    for mark, codec in _BOMS:
        if data.startswith(mark):
            return codec, len(mark)
    return None


def prescan_meta(data: bytes) -> str | None:
    """The charset label of an HTML ``<meta>`` (or XML declaration) in the first 1024 bytes."""
    head = _COMMENT.sub(b"", data[:META_PRESCAN_BYTES])
    found = _META.search(head) or _XML_DECL.search(head)
    if found is None:
        return None
    codec = lookup(found.group(1))
    # WHATWG prescan: "If charset is UTF-16BE/LE, then set charset to UTF-8" (bytes that
    # spell <meta> in ASCII cannot be UTF-16).
    return "utf-8" if codec in ("utf-16-le", "utf-16-be") else codec


def decodes(codec: str, data: bytes, final: bool) -> bool:
    """True if ``data`` is valid in ``codec`` (an incomplete tail is fine unless final)."""
    try:
        if codec == "utf-8":  # what the incremental UTF-8 decoder calls, without building one
            codecs.utf_8_decode(data, "strict", final)
        else:
            codecs.getincrementaldecoder(codec)("strict").decode(data, final)
    except UnicodeDecodeError:
        return False
    return True


def sniff(data: bytes, final: bool) -> str:
    """The corpus rule for undeclared text: valid UTF-8 -> UTF-8, else GB18030."""
    return "utf-8" if decodes("utf-8", data, final) else "gb18030"


def decode_bytes(data: bytes, declared: str | None = None) -> str:
    """One-shot decode of a short value (a form field, a path segment): the declared
    charset if it decodes, else UTF-8 if valid, else GB18030 (invalid bytes -> U+FFFD)."""
    codec = lookup(declared)
    if codec is None:
        try:  # sniff: valid UTF-8 is UTF-8 (the commonest case, one decode)
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("gb18030", "replace")
    if not decodes(codec, data, True):
        codec = sniff(data, True)
    return data.decode(codec, "replace")


NOT_ASCII = re.compile(rb"[\x80-\xff\x1b]")  # ESC too: ISO-2022 shifts hide in ASCII
_ASCII_UNSAFE = frozenset({"utf-16-le", "utf-16-be", "iso2022_jp"})
"""Codecs in which ASCII bytes are not ASCII text: chosen before any text is produced."""

_STATEFUL = frozenset({"iso2022_jp"})
"""Codecs whose meaning depends on earlier shift sequences: decoded with U+FFFD for
invalid bytes from the start, since an error cannot be recovered by re-decoding a slice
(their errors are therefore not listed)."""


class TextDecoder:
    """Bytes in, text out, choosing the charset by the order in the module docstring.

    ASCII text reads the same in every candidate charset, so it is produced at once;
    the choice is made on the ``sniff_bytes`` that start at the first non-ASCII byte (or
    on what there is at the end), which makes it independent of how the input is split.
    Holds at most ``sniff_bytes`` of input, plus a few bytes of an incomplete character.
    """

    def __init__(self, declared: str | None, *, html: bool = False,
                 sniff_bytes: int = SNIFF_BYTES) -> None:
        self.declared = declared
        self.html = html
        self.sniff_bytes = max(sniff_bytes, 4)
        self.encoding: str | None = None
        """The Python codec in use once chosen."""
        self.errors: list[str] = []
        self._held = bytearray()
        self._prefix = b""  # the first META_PRESCAN_BYTES of the body, for <meta>
        self._started = False  # the BOM check is done
        self._decoder: codecs.IncrementalDecoder | None = None

    def feed(self, data: bytes) -> str:
        if self._decoder is not None:
            return self._decode(data, final=False)
        if len(self._prefix) < META_PRESCAN_BYTES:
            self._prefix += data[:META_PRESCAN_BYTES - len(self._prefix)]
        self._held += data
        return self._undecided(final=False)

    def finish(self) -> str:
        text = "" if self._decoder is not None else self._undecided(final=True)
        return text + self._decode(b"", final=True)

    def _undecided(self, final: bool) -> str:
        """Before the choice: BOM check, ASCII passed through, then choose on a window."""
        if not self._started:
            if len(self._held) < 3 and not final:
                return ""
            self._started = True
            if self._choose_early():
                return self._decode(self._take(len(self._held)), final)
        found = NOT_ASCII.search(self._held)
        cut = len(self._held) if found is None else found.start()
        text = self._take(cut).decode("ascii")
        if self._held and (final or self._window_ready()):
            self._choose(bytes(self._held[:self.sniff_bytes]))
            text += self._decode(self._take(len(self._held)), final)
        return text

    def _window_ready(self) -> bool:
        return window_ready(len(self._held), self.declared, self.html, len(self._prefix),
                            self.sniff_bytes)

    def _take(self, count: int) -> bytes:
        if count >= len(self._held):  # all of it (the common case): one copy, no move
            piece = bytes(self._held)
            self._held.clear()
            return piece
        piece = bytes(self._held[:count])
        del self._held[:count]
        return piece

    def _choose_early(self) -> bool:
        """A BOM, or a declared charset in which ASCII bytes are not ASCII text."""
        marked = bom(bytes(self._held[:3]))
        if marked is not None:
            del self._held[:marked[1]]
            self._start(marked[0])
            return True
        codec = lookup(self.declared)
        if codec in _ASCII_UNSAFE:
            self._start(codec)
            return True
        return False

    def _choose(self, window: bytes) -> None:
        self._start(choose(self.declared, self.html, self._prefix, window, self.errors))

    def resume(self, prefix: bytes, codec: str | None, errors: str = "strict") -> None:
        """Continue after another reader (rules/htmlscan.py) checked the BOM: ``prefix``
        is the first ``META_PRESCAN_BYTES`` of the body; ``codec`` the charset it chose
        (decoding with ``errors``), or None when the choice is still to be made."""
        self._started = True
        self._prefix = prefix[:META_PRESCAN_BYTES]
        if codec is not None:
            self._start(codec, errors)

    def _start(self, codec: str, errors: str = "strict") -> None:
        if codec in _STATEFUL:
            errors = "replace"  # see _STATEFUL: recovery below cannot replay a shift state
        self.encoding = codec
        self._decoder = codecs.getincrementaldecoder(codec)(errors)

    def _decode(self, data: bytes, final: bool) -> str:
        if self._decoder is None:
            return ""
        try:
            return self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            # Invalid bytes after the choice: U+FFFD, as a browser shows them.
            pending = bytes(exc.object)
            good = pending[:exc.start].decode(self.encoding or "utf-8")
            self.errors.append(f"invalid {self.encoding} text: replaced with U+FFFD")
            self._start(self.encoding or "utf-8", "replace")
            return good + self._decode(pending[exc.start:], final)


def window_ready(held: int, declared: str | None, html: bool, prefix: int,
                 sniff_bytes: int) -> bool:
    """Whether ``held`` bytes from the first non-ASCII byte on (and ``prefix`` bytes of
    the body) are enough to choose: the sniff window is full, and for undeclared HTML the
    1024 bytes that a <meta> may sit in have arrived (WHATWG waits for them too)."""
    if held < sniff_bytes:
        return False
    needs_meta = html and lookup(declared) is None
    return not needs_meta or prefix >= META_PRESCAN_BYTES


def choose(declared: str | None, html: bool, prefix: bytes, window: bytes,
           errors: list[str]) -> str:
    """The charset: declared (Content-Type), then <meta> for HTML, then sniffed; a declared
    charset that fails on the window is replaced by the sniffed one. An incomplete
    character at the window's end does not count against a charset (the body may be
    cut). Why another was chosen is appended to ``errors``."""
    codec = lookup(declared)
    if codec is None and declared:
        errors.append(f"unknown charset label {declared[:40]!r}: sniffed")
    if codec is None and html:
        codec = prescan_meta(prefix)
    if codec is not None and not decodes(codec, window, False):
        errors.append(f"declared charset {codec} does not decode the body: sniffed")
        codec = None
    return codec or sniff(window, False)
