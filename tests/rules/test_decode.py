"""BodyDecoder: codings -> charset -> container, bounded, never raising; and the shared
"whole / one byte at a time / random splits" helpers used by every decoder test."""

from __future__ import annotations

import gzip
import json
import random
import time
import tracemalloc
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote_from_bytes

import brotli
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rules.htmlscan as htmlscan
from rules.containers import RUN_BREAK
from rules.decode import (
    BodyDecoder,
    Break,
    DecodeLimits,
    Text,
    container_for,
    sniff_media_type,
)
from rules.errors import InputError
from rules.wire import BodyData, Head, Http1Stream, ParseError, parse_message

T = TypeVar("T", bytes, str)


@pytest.fixture(autouse=True, scope="module")
def _python_html_path() -> object:
    """These tests read the ``Text`` events of the Python decoding path; the compiled HTML
    scanner gives normalised text instead, held equal to this path by test_htmlscan.py."""
    saved, htmlscan.ENABLED = htmlscan.ENABLED, False
    yield
    htmlscan.ENABLED = saved

# -- shared helpers (STYLE.md 3) ------------------------------------------------------


def split_ways(data: T, seeds: Sequence[int] = range(4)) -> list[list[T]]:
    """The same input whole, one element at a time, and in random pieces."""
    ways = [[data], [data[i:i + 1] for i in range(len(data))]]
    for seed in seeds:
        rng = random.Random(seed)
        pieces, pos = [], 0
        while pos < len(data):
            step = rng.choice((1, 2, 3, 7, 64, 1000))
            pieces.append(data[pos:pos + step])
            pos += step
        ways.append(pieces)
    return ways


def _expand(events: Sequence[object]) -> list[object]:
    """A RUN_BREAK inside a Text ends the run just like a Break event."""
    out: list[object] = []
    for event in events:
        if isinstance(event, Text) and RUN_BREAK in event.text:
            for i, piece in enumerate(event.text.split(RUN_BREAK)):
                if i:
                    out.append(Break())
                if piece:
                    out.append(Text(event.where, piece))
        else:
            out.append(event)
    return out


def runs(events: Sequence[object]) -> list[tuple[str, str]]:
    """Events -> (where, text) runs: joins Text of one run, drops empty/blank runs."""
    out: list[tuple[str, str]] = []
    where, text = "", ""
    for event in [*_expand(events), Break()]:
        if isinstance(event, Text) and event.where == where:
            text += event.text
            continue
        if text and not text.isspace():
            out.append((where, text))
        where, text = (event.where, event.text) if isinstance(event, Text) else ("", "")
    return out


def decode_in(pieces: Sequence[bytes], headers: list[tuple[bytes, bytes]], *,
              is_request: bool = False, limits: DecodeLimits = DecodeLimits()) -> tuple[
                  list[tuple[str, str]], BodyDecoder]:
    decoder = BodyDecoder(headers, is_request=is_request, limits=limits)
    events: list[object] = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    events.extend(decoder.finish())
    return runs(events), decoder


def assert_same_every_way(body: bytes, headers: list[tuple[bytes, bytes]],
                          **kwargs: object) -> list[tuple[str, str]]:
    whole, _ = decode_in([body], headers, **kwargs)  # type: ignore[arg-type]
    for pieces in split_ways(body)[1:]:
        got, _ = decode_in(pieces, headers, **kwargs)  # type: ignore[arg-type]
        assert got == whole
    return whole


def ct(value: str, *more: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"Content-Type", value.encode()), *more]


# -- composition ------------------------------------------------------------------------

PAGE = "<html><head><title>标题</title></head><body><p>押<b>大</b>小</p><p>第二段</p></body></html>"


def test_gzip_html_gbk_is_decoded_in_order_codings_charset_container() -> None:
    body = gzip.compress(PAGE.encode("gb18030"))
    headers = ct("text/html; charset=gbk", (b"Content-Encoding", b"gzip"))
    assert assert_same_every_way(body, headers) == [
        ("body", "标题"), ("body", "押大小"), ("body", "第二段")]


def test_stacked_codings_are_undone_right_to_left() -> None:
    body = brotli.compress(gzip.compress(PAGE.encode()))
    headers = ct("text/html", (b"Content-Encoding", b"gzip"), (b"Content-Encoding", b"br"))
    assert ("body", "押大小") in assert_same_every_way(body, headers)


def test_form_json_multipart_and_plain_bodies() -> None:
    form = b"a=%E6%8A%BC%E5%A4%A7&b=x+y"
    assert assert_same_every_way(form, ct("application/x-www-form-urlencoded"),
                                 is_request=True) == [("form:a", "押大"), ("form:b", "x y")]
    body = json.dumps({"k": "押大小"}).encode()
    assert assert_same_every_way(body, ct("application/json")) == [
        ("json", "k"), ("json", "押大小")]
    assert assert_same_every_way("纯文本".encode("gb18030"), ct("text/plain")) == [
        ("body", "纯文本")]


@pytest.mark.parametrize("mime", ["image/png", "video/mp4", "application/octet-stream",
                                  "application/javascript", "text/css", "font/woff2",
                                  "application/zip"])
def test_binary_and_code_types_yield_nothing(mime: str) -> None:
    got, decoder = decode_in([b"\xe6\x8a\xbc\xe5\xa4\xa7 text"], ct(mime))
    assert got == [] and decoder.errors == []


@pytest.mark.parametrize(("prefix", "mime"), [
    (b"<!DOCTYPE html><p>x", "text/html"),
    (b"  <html><body>", "text/html"),
    (b"\x89PNG\r\n\x1a\n....", "application/octet-stream"),
    (b"abc\x00\x01def", "application/octet-stream"),
    ("纯文本".encode(), "text/plain"),
    (b' {"k": "\\u62bc"}', "application/json"),
    (b"[1, 2]", "application/json"),
    (b"{not json", "text/plain"),
])
def test_missing_content_type_is_sniffed(prefix: bytes, mime: str) -> None:
    assert sniff_media_type(prefix) == mime


def test_missing_content_type_html_body_is_read_as_html() -> None:
    got = assert_same_every_way(b"<html><body><p>a<b>b</b></p><p>c</p>" + b" " * 600, [])
    assert got == [("body", "ab"), ("body", "c")]


def test_container_choice_covers_xml_json_suffixes_and_text() -> None:
    limits = DecodeLimits()
    assert type(container_for("application/rss+xml", {}, limits)).__name__ == "Html"
    assert type(container_for("application/vnd.api+json", {}, limits)).__name__ == "JsonStrings"
    assert type(container_for("text/csv", {}, limits)).__name__ == "PlainText"
    assert container_for("image/svg", {}, limits) is None


def test_decoded_bytes_cap_truncates_and_says_so() -> None:
    limits = DecodeLimits(max_decoded_bytes=1000)
    body = gzip.compress(b"a" * 100_000)
    got, decoder = decode_in([body], ct("text/plain", (b"Content-Encoding", b"gzip")),
                             limits=limits)
    assert decoder.truncated and got == [("body", "a" * 1000)]


def test_uncompressed_body_is_capped_too() -> None:
    got, decoder = decode_in([b"b" * 5000], ct("text/plain"),
                             limits=DecodeLimits(max_decoded_bytes=100))
    assert decoder.truncated and got == [("body", "b" * 100)]


def test_errors_of_every_layer_are_reported() -> None:
    body = b'{"a": "\\ud800"}'
    _, decoder = decode_in([body], ct("application/json", (b"Content-Encoding", b"x-zip")))
    assert any("unknown content-coding" in e for e in decoder.errors)
    assert any("lone surrogate" in e for e in decoder.errors)


def test_feed_after_finish_is_ignored() -> None:
    decoder = BodyDecoder(ct("text/plain"), is_request=False)
    assert decoder.feed(b"abc") + decoder.finish() == [Text("body", "abc")]
    assert decoder.feed(b"more") == [] and decoder.finish() == []


@pytest.mark.parametrize("bad", [{"max_decoded_bytes": 0}, {"sniff_bytes": -1}])
def test_limits_must_be_positive(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        DecodeLimits(**bad)


# -- properties (hypothesis) ---------------------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from("押大小六合彩中文繁體測試abcXYZ019 ，。"), min_size=1,
               max_size=60).filter(lambda s: not s.isspace() and s == s.strip())


def _encode_coding(data: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "deflate-raw":
        compressor = zlib.compressobj(wbits=-15)
        return compressor.compress(data) + compressor.flush()
    if coding == "br":
        return brotli.compress(data)
    if coding == "gzip, br":
        return brotli.compress(gzip.compress(data))
    return data


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _html_escape(text: str, rng: random.Random) -> str:
    out = []
    for char in text:
        choice = rng.randrange(4)
        out.append(char if choice == 0 else f"&#{ord(char)};" if choice == 1
                   else f"&#x{ord(char):X};" if choice == 2 else f"<b>{char}</b>")
    return "<p>" + "".join(out) + "</p>"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT, charset=st.sampled_from(["utf-8", "gb18030", "gbk", "utf-16"]),
       declared=st.booleans(),
       coding=st.sampled_from(["identity", "gzip", "deflate", "deflate-raw", "br", "gzip, br"]),
       container=st.sampled_from(["plain", "html", "form", "json"]),
       seed=st.integers(0, 10**6))
def test_text_is_recovered_after_any_charset_coding_escape_and_split(
        text: str, charset: str, declared: bool, coding: str, container: str,
        seed: int) -> None:
    rng = random.Random(seed)
    encoding = "gb18030" if charset == "gbk" else charset
    if charset == "utf-16":
        declared = False  # a BOM says it
    if container == "html":
        body, mime = _html_escape(text, rng).encode(encoding), "text/html"
    elif container == "form":
        body, mime = b"f=" + quote_from_bytes(text.encode(encoding)).encode(), \
            "application/x-www-form-urlencoded"
    elif container == "json":
        escaped = rng.random() < 0.5  # \uXXXX escapes, or raw characters in the charset
        body = json.dumps({"v": text}, ensure_ascii=escaped).encode(encoding)
        mime = "application/json"
    else:
        body, mime = text.encode(encoding), "text/plain"
    if charset == "utf-16" and container != "form":
        body = b"\xff\xfe" + text.encode("utf-16-le") if container == "plain" else body
        if container != "plain":
            return  # markup in UTF-16 without BOM-aware markup is not a case browsers meet
    label = f"; charset={charset}" if declared and container != "form" else ""
    if encoding == "gb18030" and not label:
        # The sniff rule reads valid UTF-8 as UTF-8: short GB18030 text can be both.
        assume(not _valid_utf8(text.encode(encoding) if container == "form" else body))
    headers = ct(mime + label)
    if coding != "identity":
        headers.append((b"Content-Encoding", coding.replace("-raw", "").encode()))
    wire = _encode_coding(body, coding)
    pieces = split_ways(wire, seeds=[seed])[rng.choice((0, 2))]
    got, decoder = decode_in(pieces, headers, is_request=True)
    texts = [t for _, t in got]
    assert text in texts, (texts, decoder.errors)
    assert not decoder.truncated


HEADER_VALUES = st.sampled_from([
    b"text/html", b"text/html; charset=gbk", b"text/plain; charset=utf-16",
    b"application/json", b"multipart/form-data; boundary=x", b"multipart/form-data",
    b"application/x-www-form-urlencoded; charset=big5", b"image/png", b"text/xml",
    b"text/html; charset=\"x-bogus\"", b"", b";;;=",
])
CODINGS = st.sampled_from([b"gzip", b"deflate", b"br", b"gzip, br", b"identity", b"zstd",
                           b"x-foo", b"", b"gzip, gzip"])


@settings(max_examples=300, deadline=None)
@given(ctype=HEADER_VALUES, coding=CODINGS, body=st.binary(max_size=400),
       split=st.integers(1, 50))
def test_body_decoder_never_raises(ctype: bytes, coding: bytes, body: bytes, split: int) -> None:
    headers = [(b"Content-Type", ctype), (b"Content-Encoding", coding)]
    decoder = BodyDecoder(headers, is_request=False)
    for pos in range(0, len(body), split):
        decoder.feed(body[pos:pos + split])
    decoder.finish()
    assert isinstance(decoder.errors, list)


# -- the corpus ----------------------------------------------------------------------------

BAD_FILE_SECONDS = 5.0
"""Wall-clock bound per bad input: a 1 GiB bomb must stop at the cap long before this."""

BAD_FILE_PEAK_BYTES = 80 * 1024 * 1024
"""Peak traced memory per bad input: the 16 MiB cap plus the events holding its text,
far below the 1 GiB the bombs would cost unbounded."""


def _drive(data: bytes) -> tuple[list[Text | Break], BodyDecoder | None, list[str]]:
    """parse_message, then the stream events into a BodyDecoder (best effort on errors)."""
    try:
        parse_message(data)
    except InputError as exc:
        assert exc.decoder == "http" and exc.reason
    stream = Http1Stream(not data.lstrip(b"\r\n").startswith(b"HTTP/"))
    decoder: BodyDecoder | None = None
    events: list[Text | Break] = []
    problems: list[str] = []
    for event in stream.feed(data) + stream.eof():
        if isinstance(event, Head):
            decoder = BodyDecoder(event.headers, is_request=event.is_request)
        elif isinstance(event, BodyData) and decoder is not None:
            events.extend(decoder.feed(event.data))
        elif isinstance(event, ParseError):
            problems.append(event.reason)
    if decoder is not None:
        events.extend(decoder.finish())
    return events, decoder, problems


def test_every_bad_http_input_is_bounded_and_never_crashes(corpus: Path) -> None:
    manifest = [json.loads(line) for line in
                (corpus / "bad" / "manifest.jsonl").read_text("utf-8").splitlines() if line]
    files = [item for item in manifest if item["kind"] == "http"]
    assert files
    for item in files:
        data = (corpus / "bad" / item["file"]).read_bytes()
        tracemalloc.start()
        started = time.monotonic()
        _, decoder, problems = _drive(data)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1] - len(data)
        tracemalloc.stop()
        assert elapsed < BAD_FILE_SECONDS, item
        assert peak < BAD_FILE_PEAK_BYTES, (item, peak)
        if item["expect"] == "survive-bounded":
            assert decoder is not None and decoder.truncated, item
        if item["expect"].startswith("reject"):
            assert problems, item


def test_planted_keywords_are_in_the_decoded_text_of_every_block_message(corpus: Path) -> None:
    from rules.normalize import normalize
    from rules.target import host_of, idna_text, target_runs

    labels = [json.loads(line) for line in
              (corpus / "http" / "labels.jsonl").read_text("utf-8").splitlines() if line]
    missed = []
    for label in labels:
        if label["expect"] != "block" or not label.get("keyword"):
            continue
        message = parse_message((corpus / "http" / label["file"]).read_bytes())
        got, _ = decode_in([message.body], message.headers, is_request=message.is_request)
        texts = [text for _, text in got]
        if message.is_request:
            texts += [t for _, t in runs(target_runs(message.target or b"/"))]
            texts.append(idna_text(host_of(message.target or b"/", message.headers)) or "")
        if not any(normalize(label["keyword"]) in normalize(t) for t in texts):
            missed.append((label["file"], label["keyword"], label["transform"]))
    assert not missed


def test_near_misses_do_not_contain_the_keyword_they_resemble(corpus: Path) -> None:
    from rules.normalize import normalize
    labels = [json.loads(line) for line in
              (corpus / "http" / "labels.jsonl").read_text("utf-8").splitlines() if line]
    for label in labels:
        if not label.get("near_miss_of") or label["direction"] != "response":
            continue
        message = parse_message((corpus / "http" / label["file"]).read_bytes())
        got, _ = decode_in([message.body], message.headers)
        assert not any(normalize(label["near_miss_of"]) in normalize(t) for _, t in got), label


def test_corpus_bodies_decode_the_same_fed_whole_or_in_pieces(corpus: Path) -> None:
    for path in sorted((corpus / "http").glob("*.http"))[:60]:
        message = parse_message(path.read_bytes())
        whole, _ = decode_in([message.body], message.headers, is_request=message.is_request)
        for pieces in split_ways(message.body, seeds=[1])[1:]:
            got, _ = decode_in(pieces, message.headers, is_request=message.is_request)
            assert got == whole, path.name

