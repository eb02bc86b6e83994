"""HTTP/1 framing: heads, bodies, keep-alive, pipelining, limits and bad input."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.errors import InputError
from rules.wire import (
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    MAX_LINE_BYTES,
    BodyData,
    EndOfMessage,
    Event,
    Head,
    Http1Stream,
    ParseError,
    parse_message,
)
from tests.rules.test_decode import split_ways

GET = b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\n\r\n"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
           b"5;ext=1;quoted=\"a b\"\r\nhello\r\n6 \r\n world\r\n0\r\nX-Trailer: yes\r\n"
           b"X-Other: 2\r\n\r\n")


def collect(events: list[Event]) -> list[object]:
    """Events with adjacent BodyData joined (how pieces are split does not matter)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, BodyData) and out and isinstance(out[-1], BodyData):
            out[-1] = BodyData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def stream_events(pieces: list[bytes], is_request: bool, methods: tuple[str, ...] = ()) -> \
        list[object]:
    stream = Http1Stream(is_request)
    for method in methods:
        stream.expect_method(method)
    events: list[Event] = []
    for piece in pieces:
        events.extend(stream.feed(piece))
    return collect(events + stream.eof())


def same_every_way(data: bytes, is_request: bool, methods: tuple[str, ...] = ()) -> list[object]:
    whole = stream_events([data], is_request, methods)
    for pieces in split_ways(data)[1:]:
        assert stream_events(pieces, is_request, methods) == whole
    return whole


def test_request_with_origin_form_target() -> None:
    message = parse_message(GET)
    assert (message.is_request, message.method, message.target, message.version) == (
        True, "GET", b"/a?b=c", "1.1")
    assert message.headers == [(b"Host", b"example.com")] and message.body == b""


def test_absolute_form_target_is_kept_whole() -> None:
    message = parse_message(b"GET http://example.com/p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert message.target == b"http://example.com/p?q=1"


def test_response_with_content_length() -> None:
    message = parse_message(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  v \r\n\r\nhello")
    assert (message.status, message.body) == (200, b"hello")
    assert message.headers[1] == (b"X-A", b"v")  # surrounding whitespace is not the value


def test_chunked_body_with_extensions_and_trailers_is_dechunked() -> None:
    events = same_every_way(CHUNKED, is_request=False)
    assert isinstance(events[0], Head) and events[1:] == [BodyData(b"hello world"),
                                                           EndOfMessage()]
    assert parse_message(CHUNKED).body == b"hello world"


def test_keep_alive_and_pipelined_requests_come_out_in_order() -> None:
    post = b"POST /f HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    chunked = (b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nxy\r\n0\r\n\r\n")
    events = same_every_way(GET + post + b"\r\n" + chunked + GET, is_request=True)
    kinds = [(type(e).__name__, getattr(e, "method", None) or getattr(e, "data", None))
             for e in events]
    assert kinds == [("Head", "GET"), ("EndOfMessage", None), ("Head", "POST"),
                     ("BodyData", b"abc"), ("EndOfMessage", None), ("Head", "PUT"),
                     ("BodyData", b"xy"), ("EndOfMessage", None), ("Head", "GET"),
                     ("EndOfMessage", None)]


def test_response_to_head_has_no_body_even_with_content_length() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events = same_every_way(head + second, is_request=False, methods=("HEAD", "GET"))
    assert [type(e).__name__ for e in events] == [
        "Head", "EndOfMessage", "Head", "BodyData", "EndOfMessage"]


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(status: int) -> None:
    data = (f"HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n".encode()
            + b"HTTP/1.1 200 OK\r\n\r\nrest")
    events = same_every_way(data, is_request=False)
    assert events[1] == EndOfMessage() and events[-2:] == [BodyData(b"rest"), EndOfMessage()]


def test_interim_1xx_responses_precede_the_final_one() -> None:
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz")
    events = same_every_way(data, is_request=False, methods=("HEAD",))
    statuses = [e.status for e in events if isinstance(e, Head)]
    assert statuses == [100, 103, 200]
    assert BodyData(b"z") not in events  # the final response answers HEAD: no body


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
    b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01binary",
])
def test_upgrade_and_connect_turn_the_stream_into_an_ignored_tunnel(data: bytes) -> None:
    methods = ("CONNECT",) if b" 200 " in data else ()
    events = same_every_way(data, is_request=False, methods=methods)
    assert [type(e).__name__ for e in events] == ["Head", "EndOfMessage"]


def test_connect_request_is_followed_by_a_tunnel() -> None:
    events = same_every_way(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n"
                            b"\x16\x03\x01tls", is_request=True)
    assert isinstance(events[0], Head) and events[0].target == b"example.com:443"
    assert events[1:] == [EndOfMessage()]


def test_response_without_length_runs_until_close() -> None:
    events = same_every_way(b"HTTP/1.0 200 OK\r\n\r\nall of it", is_request=False)
    assert events[1:] == [BodyData(b"all of it"), EndOfMessage()]


def test_after_a_parse_error_the_stream_stays_silent() -> None:
    stream = Http1Stream(True)
    assert isinstance(stream.feed(b"BAD\x00 / HTTP/1.1\r\n\r\n")[-1], ParseError)
    assert stream.feed(GET) == [] and stream.eof() == []


def test_error_offsets_point_into_the_stream() -> None:
    data = GET + b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    events = Http1Stream(True).feed(data)
    assert events[-1] == ParseError("invalid chunk size line b'zz'", len(data) - 4)
    assert str(events[-1]) == f"http: invalid chunk size line b'zz' at byte {len(data) - 4}"


BAD = [
    (b"", "empty message"),
    (b"\r\n\r\n", "empty message"),
    (b"GARBAGE\r\n\r\n", "bad message head"),
    (b"GET / HTTP/9.9\r\n\r\n", "Invalid HTTP version"),
    (b"HTTP/1.1 abc OK\r\n\r\n", "Invalid status"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "Invalid header value char"),
    (b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\n\r\n", "bad message head"),
    (b"HTTP/1.1 200 OK\nServer: x\n\n", "bad message head"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello",
     "Duplicate Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
     "unsupported Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx", "unsupported Transfer-Encoding"),
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "HTTP/1.0"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\n\r\n", "bad message head"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
     "invalid chunk size line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 24 + b"\r\n",
     "chunk size too large"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello5\r\n",
     "not followed by CRLF"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n", "not ended by CRLF"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
     "inside a chunked body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
     "invalid trailer line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "95 body bytes missing"),
    (b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Le", "inside a message head"),
    (GET + GET, "data after the end of the message"),
    (b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n"
     b"GET /admin HTTP/1.1\r\n\r\n",
     "Duplicate Content-Length"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_messages_raise_a_clear_input_error(data: bytes, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_message(data)
    assert caught.value.decoder == "http"
    assert message in caught.value.reason


def test_head_byte_limit_is_enforced_before_the_head_ends() -> None:
    line = b"X: " + b"a" * 1000 + b"\r\n"
    stream = Http1Stream(False)
    events = stream.feed(b"HTTP/1.1 200 OK\r\n")
    for _ in range(MAX_HEAD_BYTES // len(line) + 2):
        events.extend(stream.feed(line))
    assert events and "longer than" in events[-1].reason  # type: ignore[union-attr]


def test_line_limit_is_enforced() -> None:
    with pytest.raises(InputError, match="line longer than"):
        parse_message(b"GET /" + b"a" * (MAX_LINE_BYTES + 1) + b" HTTP/1.1\r\n\r\n")
    stream = Http1Stream(True)
    assert "line longer than" in stream.feed(b"GET /" + b"a" * (MAX_LINE_BYTES + 10))[-1].reason  # type: ignore[union-attr]


def test_header_count_limit_is_enforced() -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
    with pytest.raises(InputError, match="header fields"):
        parse_message(b"HTTP/1.1 200 OK\r\n" + many + b"\r\n")
    just = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT))
    assert len(parse_message(b"HTTP/1.1 204 OK\r\n" + just + b"\r\n").headers) == MAX_HEADER_COUNT


def test_trailer_section_is_bounded() -> None:
    trailers = b"".join(b"T%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
    with pytest.raises(InputError, match="trailer section too large"):
        parse_message(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + trailers
                      + b"\r\n")


def test_a_head_fed_a_byte_at_a_time_costs_linear_time() -> None:
    stream = Http1Stream(False)
    data = b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"v" * (MAX_LINE_BYTES - 100) + b"\r\n"
    data += b"".join(b"X-%d: %s\r\n" % (i, b"w" * 300) for i in range(200))
    started = time.process_time()
    events: list[Event] = []
    for i in range(len(data)):
        events.extend(stream.feed(data[i:i + 1]))
    events.extend(stream.feed(b"\r\n"))
    assert time.process_time() - started < 5.0
    assert isinstance(events[0], Head) and len(events[0].headers) == 201


def test_huge_announced_chunk_streams_without_buffering() -> None:
    stream = Http1Stream(False)
    stream.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7fffffff\r\n")
    sent = 0
    for _ in range(100):
        events = stream.feed(b"x" * 10_000)
        sent += sum(len(e.data) for e in events if isinstance(e, BodyData))
    assert sent == 1_000_000 and len(stream._buf) == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_nothing_but_input_error(data: bytes) -> None:
    with contextlib.suppress(InputError):
        parse_message(data)


@settings(max_examples=400, deadline=None)
@given(base=st.sampled_from([GET, CHUNKED, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"]),
       flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, 300))
def test_mutated_messages_raise_nothing_but_input_error(
        base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(base[:cut] if cut < len(base) else base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    with contextlib.suppress(InputError):
        parse_message(bytes(data))
    stream = Http1Stream(True)
    for i in range(len(data)):
        stream.feed(bytes(data[i:i + 1]))
    stream.eof()
