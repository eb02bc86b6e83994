"""Containers: form, multipart, JSON, plain, HTML wrapper, Content-Type parsing."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.containers import (
    MAX_NAME_BYTES,
    MAX_PART_HEAD_BYTES,
    Break,
    FormUrlencoded,
    Html,
    JsonStrings,
    Multipart,
    PlainText,
    Text,
    is_textual,
    parse_content_type,
    text_event,
)
from tests.rules.test_decode import runs, split_ways

type Reader = PlainText | Html | FormUrlencoded | Multipart | JsonStrings


def read(make: Callable[[], Reader], body: bytes) -> tuple[list[tuple[str, str]], list[str]]:
    """Runs and errors of ``body``, checked equal whole, byte by byte and in random pieces."""
    results = []
    for pieces in split_ways(body, seeds=[0, 1]):
        reader = make()
        events: list[Text | Break] = []
        for piece in pieces:
            events.extend(reader.feed(piece))
        events.extend(reader.finish())
        assert all(isinstance(e, (Text, Break)) for e in events)
        results.append((runs(events), sorted(set(reader.errors))))
    assert all(result == results[0] for result in results)
    return results[0]


@pytest.mark.parametrize(("value", "expected"), [
    (None, ("", {})),
    (b"text/html", ("text/html", {})),
    (b"Text/HTML; Charset=GBK", ("text/html", {"charset": "GBK"})),
    ('multipart/form-data; boundary="a b;c"; x=1', ("multipart/form-data",
                                                    {"boundary": "a b;c", "x": "1"})),
    (b'text/plain; charset="u\\"tf-8"', ("text/plain", {"charset": 'u"tf-8'})),
    (b";;;=", ("", {})),
])
def test_parse_content_type(value: bytes | str | None,
                            expected: tuple[str, dict[str, str]]) -> None:
    assert parse_content_type(value) == expected


@pytest.mark.parametrize(("mime", "textual"), [
    ("text/plain", True), ("text/csv", True), ("application/json", True),
    ("application/vnd.api+json", True), ("image/svg+xml", True), ("text/javascript", False),
    ("text/css", False), ("image/png", False), ("application/octet-stream", False),
])
def test_is_textual(mime: str, textual: bool) -> None:
    assert is_textual(mime) is textual


# -- form --------------------------------------------------------------------------------

def form(charset: str | None = None) -> Callable[[], Reader]:
    return lambda: FormUrlencoded(charset)


def test_form_values_are_runs_percent_decoded_with_plus_as_space() -> None:
    body = b"q=%E6%8A%BC%E5%A4%A7+%E5%B0%8F&empty=&flag&n%61me=v%2Bw"
    assert read(form(), body) == ([("form:q", "押大 小"), ("form:name", "v+w")], [])


def test_form_values_sniff_utf8_else_gb18030_each_on_its_own() -> None:
    body = b"a=%E4%B8%AD&b=%D6%D0"  # UTF-8 and GB18030 of the same character
    assert read(form(), body)[0] == [("form:a", "中"), ("form:b", "中")]


def test_form_declared_charset_is_used() -> None:
    body = b"a=%C3%B0%B3%E4"  # GBK, which is also... not valid UTF-8
    assert read(form("gbk"), body)[0] == [("form:a", "冒充")]


def test_form_bad_escapes_stay_literal() -> None:
    assert read(form(), b"wd=%zz%E5%85%%41&x=%")[0] == [
        ("form:wd", "%zz鍏%A"), ("form:x", "%")]  # not UTF-8, so GB18030


def test_form_names_are_bounded_labels() -> None:
    got, _ = read(form(), b"n" * (MAX_NAME_BYTES * 5) + b"=v")
    assert got == [("form:" + "n" * MAX_NAME_BYTES, "v")]


def test_form_value_streams_without_holding_the_body() -> None:
    reader = FormUrlencoded(None)
    reader.feed(b"big=")
    for _ in range(200):
        reader.feed(b"%E6%8A%BC" * 1000)
        assert len(reader._tail) <= 2
    assert reader.finish()[-1] == Break()


# -- JSON --------------------------------------------------------------------------------

def test_json_strings_are_runs_with_escapes_and_surrogate_pairs() -> None:
    body = json.dumps({"title": "押大小", "n": [1, "😀x"], "e": "a\"b\\c/\n"}).encode()
    got, errors = read(lambda: JsonStrings(None), body)
    assert got == [("json", "title"), ("json", "押大小"), ("json", "n"), ("json", "😀x"),
                   ("json", "e"), ("json", 'a"b\\c/\n')] and errors == []


def test_json_raw_gbk_text_is_sniffed() -> None:
    body = '{"k": "押大小"}'.encode("gb18030")
    assert read(lambda: JsonStrings(None), body)[0] == [("json", "k"), ("json", "押大小")]


@pytest.mark.parametrize(("body", "texts", "error"), [
    (b'{"a": "\\ud800x"}', ["a", "\ufffdx"], "json: lone surrogate escape replaced with U+FFFD"),
    (b'{"a": "\\u00zz"}', ["a", "u00zz"], "json: invalid escape \\u kept literally"),
    (b'{"a": "\\q"}', ["a", "q"], "json: invalid escape \\q kept literally"),
    (b'{"a": "open', ["a", "open"], "json: unterminated string"),
    (b'{"b": [1, 2,', ["b"], "json: unbalanced brackets (truncated document?)"),
    (b'{"a": "\\ud800\\u00zz", "b": [1, 2,', ["a", "\ufffdu00zz", "b"],
     "json: unbalanced brackets (truncated document?)"),
])
def test_invalid_json_is_scanned_best_effort(body: bytes, texts: list[str], error: str) -> None:
    got, errors = read(lambda: JsonStrings(None), body)
    assert [text for _, text in got] == texts and error in errors


def test_long_json_string_streams_with_a_bounded_carry() -> None:
    reader = JsonStrings(None)
    out = reader.feed(b'{"k": "')
    for _ in range(300):
        out += reader.feed(b"\\u62bc" * 500)
        assert len(reader._carry) <= 12
    out += reader.feed(b'"}') + reader.finish()
    assert runs(out) == [("json", "k"), ("json", "押" * 150_000)]


# -- multipart ---------------------------------------------------------------------------

BOUNDARY = "----WebKitFormBoundarymAHczVquuXZR35i5"


def part(head: str, body: bytes) -> bytes:
    return f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + body + b"\r\n"


MULTIPART = (
    b"preamble\r\n"
    + part('Content-Disposition: form-data; name="subject"', "押大小".encode())
    + part('Content-Disposition: form-data; name="f"; filename="n.txt"\r\n'
           "Content-Type: text/plain; charset=gbk", "六合彩".encode("gb18030"))
    + part('Content-Disposition: form-data; name="img"; filename="a.png"\r\n'
           "Content-Type: image/png", b"\x89PNG\r\n\x1a\n\x00 --" + "押".encode())
    + part('Content-Disposition: form-data; name="sniffed"', "赌场".encode("gb18030"))
    + f"--{BOUNDARY}--\r\nepilogue".encode()
)


def test_multipart_text_parts_are_runs_and_binary_parts_are_skipped() -> None:
    got, errors = read(lambda: Multipart(BOUNDARY, None), MULTIPART)
    assert got == [("multipart:subject", "押大小"), ("multipart:f", "六合彩"),
                   ("multipart:sniffed", "赌场")] and errors == []


def test_multipart_part_without_head_is_text() -> None:
    body = f"--{BOUNDARY}\r\n\r\nplain\r\n--{BOUNDARY}--".encode()
    assert read(lambda: Multipart(BOUNDARY, None), body)[0] == [("multipart:", "plain")]


@pytest.mark.parametrize(("boundary", "body", "texts", "error"), [
    (None, b"--x\r\nabc\r\n--x--\r\n", ["--x\r\nabc\r\n--x--\r\n"],
     "multipart: no boundary parameter: scanned as plain text"),
    ("zz", b'--zz\r\nContent-Disposition: form-data; name="a"\r\n\r\nno closing boundary',
     ["no closing boundary"], "multipart: body ends inside a part (no closing boundary)"),
    ("zz", b"no boundary at all", [], "multipart: body ends before the closing boundary"),
    ("zz", b"--zz\r\n" + b"X: " + b"y" * (MAX_PART_HEAD_BYTES + 10), [],
     f"multipart: part head over {MAX_PART_HEAD_BYTES} bytes"),
])
def test_bad_multipart_is_scanned_best_effort(boundary: str | None, body: bytes,
                                              texts: list[str], error: str) -> None:
    got, errors = read(lambda: Multipart(boundary, None), body)
    assert [text for _, text in got] == texts and error in errors


# -- plain and HTML ------------------------------------------------------------------------

def test_fast_text_events_equal_constructed_ones() -> None:
    event = text_event("body", "押")
    assert event == Text("body", "押") and hash(event) == hash(Text("body", "押"))
    with pytest.raises(AttributeError):
        event.text = "x"  # type: ignore[misc]


def test_plain_text_is_one_run() -> None:
    assert read(lambda: PlainText("gbk"), "一\n二".encode("gb18030"))[0] == [("body", "一\n二")]


def test_html_wrapper_uses_meta_charset() -> None:
    body = b'<meta charset="gbk"><p>' + "押大".encode("gb18030") + b"</p><p>x</p>"
    assert read(lambda: Html(None), body)[0] == [("body", "押大"), ("body", "x")]


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300),
       make=st.sampled_from([lambda: FormUrlencoded(None), lambda: JsonStrings("utf-8"),
                             lambda: Multipart("b", None), lambda: Html("gbk"),
                             lambda: Multipart(None, "big5")]))
def test_readers_never_raise_on_garbage(body: bytes, make: object) -> None:
    reader = make()  # type: ignore[operator]
    for i in range(0, len(body), 7):
        reader.feed(body[i:i + 7])
    reader.finish()


def test_content_type_cache_stays_bounded_and_hands_out_copies() -> None:
    import rules.containers as module

    for i in range(module.CONTENT_TYPE_CACHE_SIZE + 10):
        assert parse_content_type(f"text/x-{i}; charset=gbk") == (f"text/x-{i}", {"charset": "gbk"})
        assert len(module._CONTENT_TYPES) <= module.CONTENT_TYPE_CACHE_SIZE
    mime, params = parse_content_type(b"text/html; charset=utf-8")
    params["charset"] = "changed by a caller"
    assert parse_content_type(b"text/html; charset=utf-8") == ("text/html", {"charset": "utf-8"})
