"""Containers: turn a decoded-from-coding body into text runs by its media type.

Owns: the ``Text``/``Break`` run events, Content-Type parsing, and the incremental readers
for text/plain, HTML (via ``rules.html``), application/x-www-form-urlencoded (each field
value a run, ``where="form:<name>"``), multipart/form-data (each text part a run,
``where="multipart:<name>"``, binary parts skipped) and JSON (each string a run,
``where="json"``).

Must not: undo content codings (``rules.codings``), raise on bad input (damage becomes an
entry of ``errors`` and the reader scans what it can), or hold more than a named bound of
input: every reader streams, carrying only an unfinished escape, delimiter or head.

Charsets: text containers decode with ``rules.charset.TextDecoder`` (BOM, declared charset,
``<meta>`` for HTML, else sniffed); a form value's percent-decoded bytes, and a multipart
text part, each get their own decoder (their declared charset, else UTF-8 if valid, else
GB18030), as corpus/README.md "How labels were decided" step 4 says.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from rules.charset import (
    META_PRESCAN_BYTES,
    NOT_ASCII,
    SNIFF_BYTES,
    TextDecoder,
    bom,
    choose,
    lookup,
    window_ready,
)
from rules.html import HtmlText
from rules.htmlscan import new_scanner

MAX_NAME_BYTES = 256
"""Longest form-field or part name kept for ``where`` (a label, not scanned text)."""

MAX_PART_HEAD_BYTES = 16 * 1024
"""Largest header block of one multipart part (browsers send about 150 bytes); a bigger
one is an error and the rest of the body is skipped."""

JSON_ESCAPE_CARRY = 12
"""Chars of an unfinished JSON escape carried between feeds (a surrogate pair is 12)."""


@dataclass(frozen=True, slots=True)
class Text:
    """Contiguous text of the current run; a ``RUN_BREAK`` inside it ends the run there."""

    where: str
    """Where the text came from: ``body``, ``json``, ``form:<name>``, ``multipart:<name>``,
    ``path``, ``query`` (a change of ``where`` also ends the run)."""
    text: str


@dataclass(frozen=True, slots=True)
class Break:
    """The current text run ends here (a keyword must not match across it)."""


@dataclass(frozen=True, slots=True)
class Normalized:
    """Text of the current run, already normalised (``rules.normalize``) and UTF-8
    encoded, as the compiled HTML scanner gives it; ``RUN_BREAK`` ends a run inside it."""

    where: str
    data: bytes
    chars: int
    """Characters in ``data``."""


type Event = Text | Break | Normalized
BREAK = Break()

RUN_BREAK = "\x00"
"""Inside ``Text.text``, ends the run like a ``Break`` event. Decoded text never
holds it (NUL is dropped from markup text; keywords cannot contain it), so the
Engine can stream many runs through one matcher call without a match spanning two."""

_new_object = object.__new__
_set_where = Text.where.__set__  # type: ignore[attr-defined,misc]
_set_text = Text.text.__set__  # type: ignore[attr-defined,misc]


def text_event(where: str, text: str) -> Text:
    """``Text(where, text)`` without the frozen dataclass ``__init__``, which goes through
    ``object.__setattr__`` for each field: the same object at half the cost, for the
    hottest loop of the Engine (one event per run of every page)."""
    event = _new_object(Text)
    _set_where(event, where)
    _set_text(event, text)
    return event

_set_data = Normalized.data.__set__  # type: ignore[attr-defined]
_set_chars = Normalized.chars.__set__  # type: ignore[attr-defined]
_set_nwhere = Normalized.where.__set__  # type: ignore[attr-defined]


def normalized_event(where: str, data: bytes, chars: int) -> Normalized:
    """``Normalized(where, data, chars)`` without the frozen dataclass ``__init__`` (see
    ``text_event``): one per page piece of the compiled HTML scanner."""
    event = _new_object(Normalized)
    _set_nwhere(event, where)
    _set_data(event, data)
    _set_chars(event, chars)
    return event


_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


_CONTENT_TYPES: dict[bytes | str, tuple[str, dict[str, str]]] = {}
CONTENT_TYPE_CACHE_SIZE = 1024
"""Content-Type values remembered by ``parse_content_type``: traffic repeats a few dozen
values, and parsing one costs more than the rest of setting up a small message's
decoder. Bounded (cleared when full) since the values come from the traffic."""


def parse_content_type(value: bytes | str | None) -> tuple[str, dict[str, str]]:
    """``text/html; charset="gbk"`` -> ("text/html", {"charset": "gbk"}) (RFC 9110 8.3.1)."""
    if value is None:
        return "", {}
    cached = _CONTENT_TYPES.get(value)
    if cached is None:
        if len(_CONTENT_TYPES) >= CONTENT_TYPE_CACHE_SIZE:
            _CONTENT_TYPES.clear()
        cached = _CONTENT_TYPES[value] = _parse_content_type(value)
    return cached[0], dict(cached[1])  # a copy: callers own their params


def _parse_content_type(value: bytes | str) -> tuple[str, dict[str, str]]:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    mime, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for found in _PARAM.finditer(";" + rest):
        raw = found.group(2).strip()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(found.group(1).lower(), raw)
    return mime.strip().lower(), params


def _label(name: bytes) -> str:
    return name[:MAX_NAME_BYTES].decode("utf-8", "replace")


class PlainText:
    """text/plain and other text: the whole body is one run."""

    def __init__(self, charset: str | None, *, where: str = "body",
                 sniff_bytes: int = SNIFF_BYTES, html: bool = False) -> None:
        self.where = where
        self._decoder = TextDecoder(charset, html=html, sniff_bytes=sniff_bytes)
        self.errors = self._decoder.errors

    def feed(self, data: bytes) -> list[Event]:
        return self._wrap(self._decoder.feed(data))

    def finish(self) -> list[Event]:
        return self._wrap(self._decoder.finish())

    def _wrap(self, text: str) -> list[Event]:
        return [Text(self.where, text)] if text else []


class Html:
    """text/html and XHTML: decoded, then cut into the runs a reader sees.

    Two paths give the same normalised text. UTF-8 pages (declared, or chosen by
    ``<meta>`` or sniffing as ``TextDecoder`` would) go through the compiled scanner
    (``rules.htmlscan``), which emits ``Normalized`` events: one C pass from bytes to the
    UTF-8 that the matcher scans. Other charsets, a missing scanner, and the rest of a
    page after input the scanner leaves alone (it hands its state over: see
    ``rules/htmlscan.py``) take the Python path, ``TextDecoder`` + ``HtmlText``, which
    emits ``Text`` events for the Engine to normalise.
    """

    def __init__(self, charset: str | None, *, sniff_bytes: int = SNIFF_BYTES) -> None:
        self.where = "body"
        self.errors: list[str] = []
        self._charset = charset
        self._sniff_bytes = max(sniff_bytes, 4)
        self._decoder: TextDecoder | None = None
        self._html: HtmlText | None = None
        codec = lookup(charset)
        self._declared_utf8 = codec == "utf-8"
        self._scan = new_scanner() if codec is None or self._declared_utf8 else None
        self._head = b""  # the first bytes, until the BOM check
        self._prefix = b""  # the first META_PRESCAN_BYTES, for <meta>
        self._window = bytearray()  # the input until the charset is chosen
        self._bom_checked = False
        self._decided = False
        self._replace: codecs.IncrementalDecoder | None = None  # after invalid UTF-8
        if self._scan is None:
            self._python(None)

    def feed(self, data: bytes) -> list[Event]:
        if self._scan is None:
            return self._python_feed(data)
        return self._compiled(data, final=False) if self._decided else self._undecided(data, False)

    def finish(self) -> list[Event]:
        if self._scan is None:
            return self._python_finish(b"")
        return self._compiled(b"", final=True) if self._decided else self._undecided(b"", True)

    # The Python path.

    def _python(self, codec: str | None, errors: str = "strict") -> None:
        """Switch to the Python path, continuing the scanner's state if there was one."""
        decoder = TextDecoder(self._charset, html=True, sniff_bytes=self._sniff_bytes)
        decoder.errors = self.errors
        if self._scan is not None:
            carry, carry_is_tag, state, in_run, _held, _pending = self._scan.state()
            self._html = HtmlText.resume(carry.decode("utf-8"), carry_is_tag, state, in_run)
            if self._bom_checked:
                decoder.resume(self._prefix, codec, errors)
        else:
            self._html = HtmlText()
        self._decoder = decoder
        self._scan = None

    def _python_feed(self, data: bytes) -> list[Event]:
        assert self._decoder is not None and self._html is not None
        text = self._html.feed_text(self._decoder.feed(data))
        return [text_event(self.where, text)] if text else []

    def _python_finish(self, data: bytes) -> list[Event]:
        # One event per feed, run breaks inline as RUN_BREAK: pages have a block tag
        # every ~100 bytes, and an event (and a matcher call) per run would cost more
        # than all the decoding (benchmarks/bench_matcher.py).
        assert self._decoder is not None and self._html is not None
        decoder, reader = self._decoder, self._html
        text = reader.feed_text(decoder.feed(data)) if data else ""
        text += reader.feed_text(decoder.finish()) + reader.finish_text()
        return [text_event(self.where, text)] if text else []

    def _hand_over(self, data: bytes, final: bool, codec: str | None,
                   errors: str = "strict") -> list[Event]:
        """The Python path takes over with ``data``, the input the scanner did not take."""
        assert self._scan is not None
        held, pending = self._scan.state()[4:]
        data = pending + data  # an unfinished character the scanner held
        self._python(codec, errors)
        # Text the scanner's normaliser held back, for the Engine's normaliser to hold.
        events: list[Event] = [text_event(self.where, held.decode("utf-8"))] if held else []
        events += self._python_finish(data) if final else self._python_feed(data)
        return events

    # The compiled path.

    def _undecided(self, data: bytes, final: bool) -> list[Event]:
        """Before the charset is chosen: the BOM check, then the input held until
        ``TextDecoder`` would choose (a sniff window from the first non-ASCII byte), and
        the same choice; a long ASCII start goes on at once (it reads the same in every
        candidate)."""
        if len(self._prefix) < META_PRESCAN_BYTES and not self._declared_utf8:  # for <meta>
            self._prefix += data[:META_PRESCAN_BYTES - len(self._prefix)]
        if not self._bom_checked:
            if self._head or len(data) < 3:
                data, self._head = self._head + data, b""  # no copy of a whole first piece
                if len(data) < 3 and not final:
                    self._head = data
                    return []
            if bom(data[:3]) is not None:  # TextDecoder takes it from the start
                return self._hand_over(data, final, None)
            self._bom_checked = True
        if self._window:  # a body in several pieces; a page in one is not copied
            self._window += data
            data, self._window = bytes(self._window), bytearray()
        found = NOT_ASCII.search(data)
        start = len(data) if found is None else found.start()
        if not final and not window_ready(len(data) - start if found else 0, self._charset, True,
                                          len(self._prefix), self._sniff_bytes):
            if start <= self._sniff_bytes:
                self._window += data  # small so far: one scanner call for all of it later
                return []
            # A long ASCII start reads the same in every candidate: on to the scanner, so
            # that what is held stays bounded by the sniff window.
            events = self._compiled(data[:start], False)
            if self._scan is None:  # handed over: the Python path takes the rest too
                return events + self._python_feed(data[start:])
            self._window += data[start:]
            return events
        whole = data
        if found is None:
            return self._compiled(whole, final)
        if self._declared_utf8:
            events = self._declared_window(whole, final)
            if events is not None:
                return events
        notes: list[str] = []
        window = whole[start:start + self._sniff_bytes]
        codec = choose(self._charset, True, self._prefix, window, notes)
        if codec != "utf-8":
            return self._hand_over(whole, final, None)  # it chooses again, the same
        self.errors.extend(notes)
        self._decided = True
        return self._compiled(whole, final)

    def _declared_window(self, data: bytes, final: bool) -> list[Event] | None:
        """UTF-8 is declared and the whole sniff window is in ``data``: if the scanner finds
        all of ``data`` valid UTF-8, so is the window, and TextDecoder would keep the
        declared charset. None, with nothing changed, when it does not (then the charset
        is chosen as TextDecoder chooses it)."""
        assert self._scan is not None
        out = self._scan.feed(data, final)
        if not isinstance(out, bytes):
            return None
        self._decided = True
        return [normalized_event(self.where, out, self._scan.chars)] if out else []

    def _compiled(self, data: bytes, final: bool) -> list[Event]:
        scan = self._scan
        assert scan is not None
        if self._replace is not None:
            data = self._replace.decode(data, final).encode("utf-8")
        out = scan.feed(data, final)  # bytes; None: left to the Python path; -1: invalid UTF-8
        if out is None:
            if self._replace is not None:  # what the replacing decoder still holds
                data += self._replace.getstate()[0]
                return self._hand_over(data, final, "utf-8", "replace")
            return self._hand_over(data, final, "utf-8" if self._decided else None)
        if isinstance(out, int):
            # Invalid UTF-8 after the choice: U+FFFD from here on, as TextDecoder does.
            self.errors.append("invalid utf-8 text: replaced with U+FFFD")
            self._replace = codecs.getincrementaldecoder("utf-8")("replace")
            return self._compiled(scan.take_pending() + data, final)
        return [normalized_event(self.where, out, scan.chars)] if out else []


class FormUrlencoded:
    """application/x-www-form-urlencoded (WHATWG URL 5.1): ``name=value&...``, ``+`` is a
    space, percent escapes are bytes; each value is its own run, decoded by its own
    charset decoder. Invalid escapes stay literal (as the WHATWG parser leaves them)."""

    def __init__(self, charset: str | None, *, sniff_bytes: int = SNIFF_BYTES) -> None:
        self.charset = charset
        self.sniff_bytes = sniff_bytes
        self.errors: list[str] = []
        self._name = bytearray()
        self._tail = b""  # an unfinished escape ("%" or "%X") of the current value
        self._field: PlainText | None = None

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        pos = 0
        while pos < len(data):
            pos = self._value(data, pos, events) if self._field else self._key(data, pos, events)
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self._field is not None:
            self._end_value(events)
        self._name.clear()
        return events

    def _key(self, data: bytes, pos: int, events: list[Event]) -> int:
        amp, eq = data.find(b"&", pos), data.find(b"=", pos)
        if eq >= 0 and (amp < 0 or eq < amp):
            self._add_name(data[pos:eq])
            name = unquote_to_bytes(bytes(self._name).replace(b"+", b" "))
            self._field = PlainText(self.charset, where=f"form:{_label(name)}",
                                    sniff_bytes=self.sniff_bytes)
            self._name.clear()
            return eq + 1
        if amp >= 0:  # a name without "=": an empty value, nothing to scan
            self._name.clear()
            return amp + 1
        self._add_name(data[pos:])
        return len(data)

    def _add_name(self, piece: bytes) -> None:
        room = MAX_NAME_BYTES * 3 - len(self._name)  # percent-encoded: 3 bytes a byte
        if room > 0:
            self._name += piece[:room]

    def _value(self, data: bytes, pos: int, events: list[Event]) -> int:
        assert self._field is not None
        amp = data.find(b"&", pos)
        end = len(data) if amp < 0 else amp
        raw = self._tail + data[pos:end]
        self._tail = b""
        if amp < 0:
            cut = raw.rfind(b"%", max(0, len(raw) - 2))
            if cut >= 0:
                raw, self._tail = raw[:cut], raw[cut:]
        events.extend(self._field.feed(unquote_to_bytes(raw.replace(b"+", b" "))))
        if amp >= 0:
            self._end_value(events)
            return amp + 1
        return len(data)

    def _end_value(self, events: list[Event]) -> None:
        assert self._field is not None
        if self._tail:
            events.extend(self._field.feed(self._tail))  # "%" or "%4" left literal
            self._tail = b""
        events.extend(self._field.finish())
        self.errors.extend(self._field.errors)
        events.append(BREAK)
        self._field = None


_JSON_SEGMENT = re.compile(r'(?:[^"\\]++|\\.)*+', re.DOTALL)
_JSON_ESCAPE = re.compile(
    r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
    r"|\\u([0-9a-fA-F]{4})|\\(.)", re.DOTALL)
_JSON_TAIL = re.compile(r"\\u(?:[dD][89abAB][0-9a-fA-F]{2}(?:\\u?[0-9a-fA-F]{0,3})?"
                        r"|[0-9a-fA-F]{0,3})\Z|\\\Z")
_SIMPLE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
           "t": "\t"}


class JsonStrings:
    """JSON (RFC 8259): every string literal (keys included) is its own run, escapes
    decoded, ``\\uD83D\\uDE00`` surrogate pairs joined. Invalid JSON is scanned on a best
    effort basis: bad escapes are kept literally, lone surrogates become U+FFFD,
    unbalanced brackets and unterminated strings are recorded as errors. Structure is
    otherwise not validated (only the strings matter for matching)."""

    def __init__(self, charset: str | None, *, sniff_bytes: int = SNIFF_BYTES) -> None:
        self._decoder = TextDecoder(charset, sniff_bytes=sniff_bytes)
        self.errors = self._decoder.errors
        self._in_string = False
        self._carry = ""
        self._depth = 0

    def feed(self, data: bytes) -> list[Event]:
        return self._scan(self._decoder.feed(data), final=False)

    def finish(self) -> list[Event]:
        events = self._scan(self._decoder.finish(), final=True)
        if self._in_string:
            self.errors.append("json: unterminated string")
            events.append(BREAK)
        elif self._depth:
            self.errors.append("json: unbalanced brackets (truncated document?)")
        return events

    def _scan(self, text: str, final: bool) -> list[Event]:
        text, self._carry = self._carry + text, ""
        events: list[Event] = []
        pos = 0
        while pos < len(text):
            if not self._in_string:
                quote = text.find('"', pos)
                outside = text[pos:] if quote < 0 else text[pos:quote]
                self._depth += outside.count("{") + outside.count("[")
                self._depth -= outside.count("}") + outside.count("]")
                if quote < 0:
                    break
                self._in_string, pos = True, quote + 1
                continue
            pos = self._string(text, pos, final, events)
        return events

    def _string(self, text: str, pos: int, final: bool, events: list[Event]) -> int:
        end = _JSON_SEGMENT.match(text, pos).end()  # type: ignore[union-attr]
        closed = end < len(text) and text[end] == '"'
        piece = text[pos:end]
        if not closed and not final:
            tail = _JSON_TAIL.search(text, max(pos, len(text) - JSON_ESCAPE_CARRY))
            if tail is not None and self._escape_starts(text, tail.start(), pos):
                piece, self._carry = text[pos:tail.start()], text[tail.start():]
            elif end < len(text):  # a lone backslash at the very end
                self._carry = text[end:]
        decoded = self._unescape(piece) if "\\" in piece else piece
        if decoded:
            events.append(Text("json", decoded))
        if closed:
            events.append(BREAK)
            self._in_string = False
            return end + 1
        return len(text)

    @staticmethod
    def _escape_starts(text: str, at: int, start: int) -> bool:
        """True if the backslash at ``at`` begins an escape (an even run precedes it)."""
        run = 0
        while at - run - 1 >= start and text[at - run - 1] == "\\":
            run += 1
        return run % 2 == 0

    def _unescape(self, piece: str) -> str:
        return _JSON_ESCAPE.sub(self._escape, piece)

    def _escape(self, found: re.Match[str]) -> str:
        high, low, single, simple = found.groups()
        if high is not None:
            return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
        if single is not None:
            code = int(single, 16)
            if 0xD800 <= code <= 0xDFFF:
                self.errors.append("json: lone surrogate escape replaced with U+FFFD")
                return "\ufffd"
            return chr(code)
        if simple in _SIMPLE:
            return _SIMPLE[simple]
        self.errors.append(f"json: invalid escape \\{simple} kept literally")
        return simple


class Multipart:
    """multipart/form-data (RFC 7578, RFC 2046 5.1): each part with no Content-Type or a
    textual one is a run decoded with the part's charset (else sniffed); other parts
    (files such as image/png) are skipped. Streams: carries at most one delimiter's
    length of body, or one part head (``MAX_PART_HEAD_BYTES``)."""

    def __init__(self, boundary: str | None, charset: str | None, *,
                 sniff_bytes: int = SNIFF_BYTES) -> None:
        self.charset = charset
        self.sniff_bytes = sniff_bytes
        self.errors: list[str] = []
        self._fallback: PlainText | None = None
        if not boundary:
            self.errors.append("multipart: no boundary parameter: scanned as plain text")
            self._fallback = PlainText(charset, where="multipart:", sniff_bytes=sniff_bytes)
        # RFC 2046 5.1.1: the delimiter is CRLF "--" boundary; the CRLF belongs to it.
        self._delim = b"\r\n--" + (boundary or "").encode("latin-1", "replace")
        self._buf = bytearray(b"\r\n")  # lets a first boundary at offset 0 match
        self._state = "preamble"
        self._part: PlainText | None = None

    def feed(self, data: bytes) -> list[Event]:
        if self._fallback is not None:
            return self._fallback.feed(data)
        self._buf += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        if self._fallback is not None:
            return self._fallback.finish()
        events: list[Event] = []
        if self._state == "body":
            self._body_piece(bytes(self._buf), events)
            self._end_part(events)
            self.errors.append("multipart: body ends inside a part (no closing boundary)")
        elif self._state in ("preamble", "head", "delim"):
            self.errors.append("multipart: body ends before the closing boundary")
        self._buf.clear()
        return events

    def _step(self, events: list[Event]) -> bool:
        state = self._state
        if state == "preamble":
            return self._find_delimiter(events, keep_body=False)
        if state == "delim":
            return self._after_delimiter()
        if state == "head":
            return self._head()
        if state == "body":
            return self._find_delimiter(events, keep_body=True)
        self._buf.clear()  # epilogue: ignored (RFC 2046 5.1.1)
        return False

    def _find_delimiter(self, events: list[Event], *, keep_body: bool) -> bool:
        at = self._buf.find(self._delim)
        if at < 0:
            keep = len(self._delim) - 1
            if len(self._buf) > keep:
                cut = len(self._buf) - keep
                if keep_body:
                    self._body_piece(bytes(self._buf[:cut]), events)
                del self._buf[:cut]
            return False
        if keep_body:
            self._body_piece(bytes(self._buf[:at]), events)
            self._end_part(events)
        del self._buf[:at + len(self._delim)]
        self._state = "delim"
        return True

    def _after_delimiter(self) -> bool:
        # RFC 2046 5.1.1: boundary "--" ends the body; else transport padding, then CRLF.
        if self._buf[:2] == b"--":
            self._state = "epilogue"
            return True
        line_end = self._buf.find(b"\r\n")
        if line_end < 0:
            if len(self._buf) > MAX_PART_HEAD_BYTES:
                return self._give_up("multipart: boundary line too long")
            return False
        del self._buf[:line_end + 2]
        self._state = "head"
        return True

    def _head(self) -> bool:
        end = 0 if self._buf[:2] == b"\r\n" else self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_PART_HEAD_BYTES:
                return self._give_up(f"multipart: part head over {MAX_PART_HEAD_BYTES} bytes")
            return False
        head = bytes(self._buf[:end])
        del self._buf[:end + (2 if end == 0 else 4)]
        self._part = self._open_part(head)
        self._state = "body"
        return True

    def _give_up(self, reason: str) -> bool:
        self.errors.append(reason)
        self._state = "epilogue"
        self._buf.clear()
        return False

    def _open_part(self, head: bytes) -> PlainText | None:
        fields: dict[str, str] = {}
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        mime, params = parse_content_type(fields.get("content-type"))
        if mime and not is_textual(mime):
            return None
        _, disposition = parse_content_type(fields.get("content-disposition"))
        name = disposition.get("name", "").encode("latin-1", "replace")
        return PlainText(params.get("charset") or self.charset, where=f"multipart:{_label(name)}",
                         sniff_bytes=self.sniff_bytes)

    def _body_piece(self, data: bytes, events: list[Event]) -> None:
        if self._part is not None and data:
            events.extend(self._part.feed(data))

    def _end_part(self, events: list[Event]) -> None:
        if self._part is not None:
            events.extend(self._part.finish())
            self.errors.extend(self._part.errors)
            events.append(BREAK)
        self._part = None


TEXT_TYPES = frozenset({
    "application/json", "application/ld+json", "application/problem+json",
    "application/xml", "application/xhtml+xml", "application/rss+xml",
    "application/atom+xml", "application/x-www-form-urlencoded",
    "multipart/form-data",
})
"""Non-``text/*`` media types whose content is text for a reader or a server."""


def is_textual(mime: str) -> bool:
    """text/*, the types above, and any ``+json``/``+xml`` structured-syntax suffix
    (RFC 6839). JavaScript and CSS are code, not text for a reader (like the contents of
    ``<script>``/``<style>``, which HTML scanning also skips)."""
    if mime in ("text/javascript", "text/css", "text/ecmascript"):
        return False
    return (mime.startswith("text/") or mime in TEXT_TYPES
            or mime.endswith(("+json", "+xml")))
