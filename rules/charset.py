"""Charsets: choose how a body's bytes become text, as a browser would, and decode them
incrementally.

Owns: WHATWG encoding labels -> Python codecs, the BOM / Content-Type / ``<meta>`` / sniff
order of corpus/README.md "How labels were decided" step 3, the bounded sniff buffer and
the incremental decoder that applies the choice.

Must not: raise on undecodable input (it recovers and records an error string), hold
more than ``sniff_bytes`` of input, or know about content codings or containers.

Order (first that applies wins):
1. a byte order mark (UTF-8, UTF-16LE, UTF-16BE) - WHATWG "decode": "BOM sniffing wins";
2. the ``charset`` of Content-Type (the caller passes it as ``declared``);
3. for HTML only, ``<meta charset>`` or ``<meta http-equiv="Content-Type">`` in the first
   1024 bytes (WHATWG "prescan a byte stream", approximated with a regex);
4. otherwise sniff: valid UTF-8 -> UTF-8, else GB18030.
gb2312, gbk and friends decode as GB18030 (WHATWG maps them to GBK, whose decoder *is*
the GB18030 decoder); big5 decodes as Big5-HKSCS (WHATWG's Big5 is the HKSCS superset).
An unknown label is ignored (sniff). A declared charset that fails to decode the sniff
buffer is replaced by the sniffed one. If decoding fails later, while everything so far
was ASCII, the rest is re-sniffed; otherwise invalid bytes become U+FFFD and an error is
recorded.
"""

from __future__ import annotations

import codecs
import re

SNIFF_BYTES = 16 * 1024
"""Bytes held back, before any text is produced, to check a declared charset or sniff an
undeclared one. Enough for the first non-ASCII text of a page; GBK text stops being
valid UTF-8 within a few characters. (A body whose first non-ASCII byte comes later is
covered by re-sniffing on the first decode error.)"""

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


def lookup(label: str | bytes | None) -> str | None:
    """WHATWG encoding label -> Python codec name; None for unknown or unsafe labels."""
    if label is None:
        return None
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
    if codec is None or not decodes(codec, data, True):
        codec = sniff(data, True)
    return data.decode(codec, "replace")


class TextDecoder:
    """Bytes in, text out, choosing the charset by the order in the module docstring.

    Output is identical however the input is split. Holds at most ``sniff_bytes`` of
    input while choosing, plus the few bytes of an incomplete character.
    """

    def __init__(self, declared: str | None, *, html: bool = False,
                 sniff_bytes: int = SNIFF_BYTES) -> None:
        self.declared = declared
        self.html = html
        self.sniff_bytes = max(sniff_bytes, META_PRESCAN_BYTES if html else 4)
        self.encoding: str | None = None
        """The Python codec in use once chosen."""
        self.errors: list[str] = []
        self._held = bytearray()
        self._decoder: codecs.IncrementalDecoder | None = None
        self._ascii_only = True
        self._resniffing = False  # the first choice failed on ASCII-only text: sniffing again
        self._consumed = 0  # input bytes handed to the current decoder before this call

    def feed(self, data: bytes) -> str:
        if self._decoder is None:
            self._held += data
            if len(self._held) < self.sniff_bytes:
                return ""
            data = self._choose()
        return self._decode(data, final=False)

    def finish(self) -> str:
        data = b""
        if self._decoder is None:
            data = self._choose()
        return self._decode(data, final=True)

    def _choose(self) -> bytes:
        """Pick the codec from the held bytes; returns them (without a BOM) for decoding.

        An incomplete character at the end of the held bytes does not disqualify a
        charset (the body may just be cut there)."""
        held = bytes(self._held)
        self._held.clear()
        if self._resniffing:
            self._start(sniff(held, False))
            return held
        marked = bom(held)
        if marked is not None:
            self._start(marked[0])
            return held[marked[1]:]
        codec = self._declared_codec(held)
        if codec is not None and not decodes(codec, held, False):
            self.errors.append(f"declared charset {codec} does not decode the body: sniffed")
            codec = None
        self._start(codec or sniff(held, False))
        return held

    def _declared_codec(self, held: bytes) -> str | None:
        codec = lookup(self.declared)
        if codec is None and self.declared:
            self.errors.append(f"unknown charset label {self.declared[:40]!r}: sniffed")
        if codec is None and self.html:
            codec = prescan_meta(held)
        return codec

    def _start(self, codec: str, errors: str = "strict") -> None:
        self.encoding = codec
        self._decoder = codecs.getincrementaldecoder(codec)(errors)

    def _decode(self, data: bytes, final: bool) -> str:
        assert self._decoder is not None
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            return self._recover(exc, final)
        if self._ascii_only and not text.isascii():
            self._ascii_only = False
        return text

    def _recover(self, exc: UnicodeDecodeError, final: bool) -> str:
        """A decode error after the choice. If all text so far was ASCII the choice was a
        guess: sniff again from the error on (once). Otherwise invalid bytes -> U+FFFD."""
        pending = bytes(exc.object)
        good = pending[:exc.start].decode(self.encoding or "utf-8")
        rest = pending[exc.start:]
        if self._ascii_only and good.isascii() and not self._resniffing:
            self._resniffing = True
            self._decoder = None
            self._held += rest
            if len(self._held) < self.sniff_bytes and not final:
                return good
            return good + self._decode(self._choose(), final)
        self.errors.append(f"invalid {self.encoding} text: replaced with U+FFFD")
        self._start(self.encoding or "utf-8", "replace")
        self._ascii_only = False
        return good + self._decode(rest, final)
