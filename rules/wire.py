"""HTTP/1.x message framing: wire bytes in, head/body/end events out (sans-IO, h11 style).

Owns: finding where a message's head ends, parsing the head (start line and header fields,
with llhttp through httptools), deciding the body length (RFC 9112 section 6.3), removing
the chunked transfer coding (chunk extensions and trailers accepted), keep-alive and
pipelining on one TCP direction, and the limits that keep a hostile peer from making us
buffer without bound.

Must not: undo content codings or charsets (``rules.codings``/``rules.charset`` do that),
decide what is allowed, or touch sockets. It never buffers a body: body bytes are emitted
as soon as they are framed, so memory is bounded by the head limits below.

Strategy. llhttp validates the head (method, target, version, header syntax, duplicate or
malformed Content-Length, CL together with TE). The body framing is ours because the
httptools API cannot skip the body of a response to HEAD, cannot stop at the end of one
message and does not report where an error occurred; owning the framing gives exact
stream offsets in every ``ParseError``.

Smuggling rules (a middlebox that frames differently from the server can be bypassed):
Content-Length together with Transfer-Encoding, differing Content-Length values, and any
Transfer-Encoding other than exactly ``chunked`` are errors, not guesses. Line endings in
the head and in chunked framing must be CRLF.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import httptools

from rules.errors import InputError

MAX_LINE_BYTES = 32 * 1024
"""Longest start line, header line, chunk-size line or trailer line. Apache and nginx stop
at 8 KiB a line, IIS at 16 KiB; a middlebox must accept at least what servers accept, so
we allow twice the largest of those."""

MAX_HEAD_BYTES = 128 * 1024
"""Largest head (start line + all header lines), and largest trailer block. h11 and
node.js stop at 16 KiB, Tomcat at 8 KiB, nginx at 4 x 8 KiB; 128 KiB covers every real
site (large Set-Cookie and CSP headers) while bounding what one stream may buffer."""

MAX_HEADER_COUNT = 256
"""Most header (or trailer) fields in one message. Apache's LimitRequestFields is 100;
browsers send about 20; servers send fewer than 100 even with many Set-Cookie lines."""

MAX_CONTENT_LENGTH = 2**63 - 1
"""Largest Content-Length or chunk size accepted (llhttp's limit: a signed 64-bit size)."""

_HEAD_END = re.compile(rb"\n\r?\n")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;[^\r\n\x00]*)?")
_NO_BODY_STATUS = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Head:
    """The start line and header fields of one message."""

    is_request: bool
    method: str | None
    """Request method (``GET``); None for a response."""
    target: bytes | None
    """Request-target as sent (origin-form ``/p?q`` or absolute-form ``http://h/p``)."""
    status: int | None
    """Response status code; None for a request."""
    version: str
    """``1.0`` or ``1.1``."""
    headers: list[tuple[bytes, bytes]]
    """Field names as sent, values without surrounding whitespace, in order."""


@dataclass(frozen=True, slots=True)
class BodyData:
    """A piece of the entity body: transfer coding removed, content coding still applied."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The current message is complete."""


@dataclass(frozen=True, slots=True)
class ParseError:
    """The stream broke HTTP/1 framing; nothing after it is parsed."""

    reason: str
    offset: int
    """Byte offset in the stream (for a bad head: where that head starts)."""

    def __str__(self) -> str:
        return str(InputError("http", self.reason, self.offset))


type Event = Head | BodyData | EndOfMessage | ParseError


@dataclass(frozen=True, slots=True)
class HttpMessage:
    """One whole message, as ``parse_message`` returns it."""

    is_request: bool
    method: str | None
    target: bytes | None
    status: int | None
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    """Entity body: de-chunked, content coding still applied."""


class _Fail(Exception):
    """Internal: framing error at a stream offset (turned into ParseError once, in feed)."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


class _HeadCollector:
    """httptools protocol object: collects the parts of one head."""

    def __init__(self) -> None:
        self.target: bytes = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


def _header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """All comma-separated elements of every field called ``name``."""
    out: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            out.extend(part.strip(b" \t") for part in value.split(b","))
    return out


def _parse_head(raw: bytes, is_request: bool, offset: int) -> Head:
    """Validate and split one head with llhttp (RFC 9112 sections 3-5)."""
    collector = _HeadCollector()
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser
    if is_request:
        parser = httptools.HttpRequestParser(collector)
    else:
        parser = httptools.HttpResponseParser(collector)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # CONNECT or Upgrade: the head itself is complete and valid.
    except httptools.HttpParserError as exc:
        # llhttp pauses after the head of a 101 response; httptools reports it as an error.
        if not (collector.complete and "Upgrade" in str(exc)):
            raise _Fail(f"bad message head: {exc}", offset) from None
    if not collector.complete:
        raise _Fail("bad message head: incomplete", offset)
    if is_request:
        method: str | None = parser.get_method().decode("ascii")  # type: ignore[union-attr]
        return Head(True, method, collector.target, None, parser.get_http_version(),
                    collector.headers)
    status = parser.get_status_code()  # type: ignore[union-attr]
    return Head(False, None, None, status, parser.get_http_version(), collector.headers)


def _content_length(head: Head, offset: int) -> int | None:
    """RFC 9110 8.6: a list of identical values may be accepted; differing ones are an error."""
    values = set(_header_values(head.headers, b"content-length"))
    if not values:
        return None
    if len(values) > 1:
        raise _Fail("conflicting Content-Length values", offset)
    value = values.pop()
    if not value.isdigit() or int(value) > MAX_CONTENT_LENGTH:
        raise _Fail(f"invalid Content-Length {value[:40]!r}", offset)
    return int(value)


def _is_chunked(head: Head, offset: int) -> bool:
    """Only exactly ``chunked`` is accepted (smuggling vectors are errors, see module doc)."""
    codings = [c.lower() for c in _header_values(head.headers, b"transfer-encoding")]
    if not codings:
        return False
    if head.version == "1.0":
        # RFC 9112 6.1: "A server or client that receives an HTTP/1.0 message containing a
        # Transfer-Encoding header field MUST treat the message as if the framing is faulty".
        raise _Fail("Transfer-Encoding in an HTTP/1.0 message", offset)
    if codings != [b"chunked"]:
        shown = b", ".join(codings)[:60].decode("latin-1")
        raise _Fail(f"unsupported Transfer-Encoding {shown!r} (only 'chunked')", offset)
    return True


class Http1Stream:
    """One direction of an HTTP/1.x connection, fed in any pieces.

    ``feed`` returns the events that the bytes so far complete; the same events come out
    whether the stream is fed whole, a byte at a time or in random pieces. After a
    ``ParseError`` the stream ignores further input (the connection is beyond repair).
    A 101 response, or a 2xx answer to CONNECT, turns the stream into a tunnel whose bytes
    are ignored. A request stream does not know when an Upgrade was accepted.
    """

    def __init__(self, is_request: bool, *, single_message: bool = False) -> None:
        """``single_message``: anything but blank lines after the first message is an error
        (``parse_message`` uses this so that a second, hidden message is not ignored)."""
        self.is_request = is_request
        self._single = single_message
        self._buf = bytearray()
        self._offset = 0  # stream offset of self._buf[0]
        self._state = "head"
        self._remaining = 0
        self._scanned = 0  # bytes of the head buffer already searched for its end
        self._head_lines = 0  # newlines in the scanned part of an unfinished head
        self._line_start = 0  # where its last, unfinished line starts
        self._trailer_bytes = 0
        self._trailer_count = 0
        self._messages = 0
        self._tunnel_after = False
        self._methods: deque[str] = deque()

    @property
    def offset(self) -> int:
        """Bytes of the stream consumed so far."""
        return self._offset

    def expect_method(self, method: str) -> None:
        """Tell a response stream the method of the next outstanding request (in order)."""
        self._methods.append(method.upper())

    def feed(self, data: bytes) -> list[Event]:
        if self._state in ("error", "tunnel", "closed"):
            return []
        self._buf += data
        events: list[Event] = []
        try:
            while self._step(events):
                pass
        except _Fail as exc:
            self._state = "error"
            self._buf.clear()
            events.append(ParseError(exc.reason, exc.offset))
        return events

    def eof(self) -> list[Event]:
        state, self._state = self._state, "closed"
        if state == "until-close":
            return [EndOfMessage()]
        if state == "head" and self._buf.strip(b"\r\n"):
            return [ParseError("connection closed inside a message head", self._offset)]
        if state == "body":
            return [ParseError(f"connection closed with {self._remaining} body bytes missing",
                               self._offset)]
        if state in ("chunk-size", "chunk-data", "chunk-crlf", "trailer"):
            return [ParseError("connection closed inside a chunked body", self._offset)]
        return []

    # -- internals: each step consumes from self._buf; False means "need more bytes" --

    def _consume(self, n: int) -> bytes:
        piece = bytes(self._buf[:n])
        del self._buf[:n]
        self._offset += n
        return piece

    def _step(self, events: list[Event]) -> bool:
        state = self._state
        if state == "head":
            return self._step_head(events)
        if state in ("body", "until-close", "chunk-data"):
            return self._step_data(events)
        if state == "chunk-size":
            return self._step_chunk_size(events)
        if state == "chunk-crlf":
            return self._step_chunk_crlf()
        if state == "trailer":
            return self._step_trailer(events)
        return False

    def _skip_blank_lines(self) -> None:
        # RFC 9112 2.2: "a server that is expecting to receive and parse a request-line
        # SHOULD ignore at least one empty line (CRLF) received prior to the request-line".
        blank = len(self._buf) - len(self._buf.lstrip(b"\r\n"))
        if blank:
            self._consume(blank)
            self._scanned = self._head_lines = self._line_start = 0

    def _step_head(self, events: list[Event]) -> bool:
        self._skip_blank_lines()
        if not self._buf:
            return False
        if self._single and self._messages:
            raise _Fail("data after the end of the message", self._offset)
        found = _HEAD_END.search(self._buf, max(0, self._scanned - 2))
        if found is None:
            self._check_partial_head()
            self._scanned = len(self._buf)
            return False
        raw = self._consume(found.end())
        self._scanned = self._head_lines = self._line_start = 0
        self._check_head_limits(raw, self._offset - len(raw))
        head = _parse_head(raw, self.is_request, self._offset - len(raw))
        events.append(head)
        self._start_body(head, events)
        return True

    def _check_partial_head(self) -> None:
        """Limits on a head still arriving; only the new bytes are looked at (a head fed
        a byte at a time must cost linear time)."""
        if len(self._buf) > MAX_HEAD_BYTES:
            raise _Fail(f"message head longer than {MAX_HEAD_BYTES} bytes", self._offset)
        last = self._buf.rfind(b"\n", self._scanned)
        if last >= 0:
            self._head_lines += self._buf.count(b"\n", self._scanned)
            self._line_start = last + 1
        if len(self._buf) - self._line_start > MAX_LINE_BYTES:
            raise _Fail(f"head line longer than {MAX_LINE_BYTES} bytes",
                        self._offset + self._line_start)
        if self._head_lines > MAX_HEADER_COUNT + 1:
            raise _Fail(f"more than {MAX_HEADER_COUNT} header fields", self._offset)

    @staticmethod
    def _check_head_limits(raw: bytes, offset: int) -> None:
        if len(raw) > MAX_HEAD_BYTES:
            raise _Fail(f"message head longer than {MAX_HEAD_BYTES} bytes", offset)
        lines = raw.split(b"\n")
        if max(map(len, lines)) > MAX_LINE_BYTES + 1:
            raise _Fail(f"head line longer than {MAX_LINE_BYTES} bytes", offset)
        if len(lines) - 3 > MAX_HEADER_COUNT:  # start line and the two final newlines
            raise _Fail(f"more than {MAX_HEADER_COUNT} header fields", offset)

    def _start_body(self, head: Head, events: list[Event]) -> None:
        """Choose the body framing of RFC 9112 6.3 for the head just parsed."""
        at = self._offset
        chunked = _is_chunked(head, at)
        length = _content_length(head, at)
        if chunked and length is not None:
            # RFC 9112 6.1: a message with both "ought to be handled as an error"
            # by an intermediary; framing by either one is a smuggling vector.
            raise _Fail("both Content-Length and Transfer-Encoding", at)
        if self._has_no_body(head):
            events.append(EndOfMessage())
            self._end_message()
        elif chunked:
            self._state = "chunk-size"
        elif length is not None:
            self._state, self._remaining = "body", length
            if length == 0:
                events.append(EndOfMessage())
                self._end_message()
        elif self.is_request:
            events.append(EndOfMessage())  # RFC 9112 6.3 rule 7: no length means no body.
            self._end_message()
        else:
            self._state = "until-close"  # RFC 9112 6.3 rule 8: read until the connection closes.

    def _has_no_body(self, head: Head) -> bool:
        """RFC 9112 6.3 rules 1-2, and CONNECT requests (the tunnel follows the head)."""
        if head.is_request:
            self._tunnel_after = head.method == "CONNECT"
            return self._tunnel_after
        status = head.status or 0
        if 100 <= status < 200:
            self._tunnel_after = status == 101
            return True  # interim: the request's final response is still to come
        method = self._methods.popleft() if self._methods else "GET"
        self._tunnel_after = method == "CONNECT" and 200 <= status < 300
        return method == "HEAD" or status in _NO_BODY_STATUS or self._tunnel_after

    def _end_message(self) -> None:
        self._messages += 1
        self._state = "tunnel" if self._tunnel_after else "head"
        if self._state == "tunnel":
            self._buf.clear()

    def _step_data(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        if self._state == "until-close":
            events.append(BodyData(self._consume(len(self._buf))))
            return False
        take = min(self._remaining, len(self._buf))
        if take:
            events.append(BodyData(self._consume(take)))
            self._remaining -= take
        if self._remaining:
            return False
        if self._state == "chunk-data":
            self._state = "chunk-crlf"
        else:
            events.append(EndOfMessage())
            self._end_message()
        return True

    def _line(self) -> bytes | None:
        """One CRLF-terminated framing line without its CRLF, or None if incomplete."""
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > MAX_LINE_BYTES:
                raise _Fail(f"chunked framing line longer than {MAX_LINE_BYTES} bytes",
                            self._offset)
            return None
        if end == 0 or self._buf[end - 1] != 0x0D:
            raise _Fail("chunked framing line not ended by CRLF", self._offset)
        return self._consume(end + 1)[:-2]

    def _step_chunk_size(self, events: list[Event]) -> bool:
        start = self._offset
        line = self._line()
        if line is None:
            return False
        # RFC 9112 7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise _Fail(f"invalid chunk size line {line[:40]!r}", start)
        digits = match.group(1).lstrip(b"0") or b"0"
        if len(digits) > 16 or int(digits, 16) > MAX_CONTENT_LENGTH:
            raise _Fail("chunk size too large", start)
        size = int(digits, 16)
        if size == 0:
            self._state, self._trailer_bytes, self._trailer_count = "trailer", 0, 0
        else:
            self._state, self._remaining = "chunk-data", size
        return True

    def _step_chunk_crlf(self) -> bool:
        if len(self._buf) < 2:
            return False
        if self._buf[:2] != b"\r\n":
            raise _Fail("chunk data not followed by CRLF", self._offset)
        self._consume(2)
        self._state = "chunk-size"
        return True

    def _step_trailer(self, events: list[Event]) -> bool:
        # RFC 9112 7.1.2: trailer-section = *( field-line CRLF ); trailers are read and
        # dropped (they never carry scanned content here).
        start = self._offset
        line = self._line()
        if line is None:
            return False
        if not line:
            events.append(EndOfMessage())
            self._end_message()
            return True
        self._trailer_bytes += len(line) + 2
        self._trailer_count += 1
        if b":" not in line or line[:1] in (b" ", b"\t"):
            raise _Fail(f"invalid trailer line {line[:40]!r}", start)
        if self._trailer_bytes > MAX_HEAD_BYTES or self._trailer_count > MAX_HEADER_COUNT:
            raise _Fail("trailer section too large", start)
        return True


def parse_message(data: bytes) -> HttpMessage:
    """Parse exactly one whole HTTP/1.x message; request or response told by the start line.

    Raises ``InputError("http", reason, offset)`` for malformed or truncated input, and
    when anything other than blank lines follows the message (a hidden second message).
    """
    is_request = not data.lstrip(b"\r\n").startswith(b"HTTP/")
    stream = Http1Stream(is_request, single_message=True)
    events = stream.feed(data) + stream.eof()
    head: Head | None = None
    body: list[bytes] = []
    for event in events:
        if isinstance(event, ParseError):
            raise InputError("http", event.reason, event.offset)
        if isinstance(event, Head):
            head = event
        elif isinstance(event, BodyData):
            body.append(event.data)
    if head is None:
        raise InputError("http", "empty message", 0)
    if not any(isinstance(event, EndOfMessage) for event in events):
        raise InputError("http", "message incomplete", stream.offset)
    return HttpMessage(head.is_request, head.method, head.target, head.status, head.version,
                       head.headers, b"".join(body))
