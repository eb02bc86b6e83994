"""The compiled HTML scanner (rules/_htmlscan.c) against the Python path it stands for.

``rules.containers.Html`` gives ``Normalized`` events from the scanner and ``Text``
events from ``TextDecoder`` + ``HtmlText`` (normalised later by ``Normalizer``); the
normalised text of a page must be the same either way, for any input and any split
(run breaks compared as boundaries: how many stand between two runs does not matter).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rules.htmlscan as htmlscan
from rules.containers import Break, Html, Normalized, Text
from rules.decode import DecodeLimits
from rules.engine import Engine
from rules.normalize import Normalizer
from rules.ruleset import Category, KeywordRule, RuleSet
from rules.verdict import Verdict

pytestmark = pytest.mark.skipif(not htmlscan.ENABLED, reason="compiled scanner not built")


def stream(chunks: list[bytes], charset: str | None, compiled: bool) -> tuple[str, list[str]]:
    """The normalised text of a body fed in ``chunks`` (as rules.engine._RunScanner
    builds it), with its errors."""
    saved = htmlscan.ENABLED
    htmlscan.ENABLED = compiled
    try:
        reader = Html(charset)
        events = [e for c in chunks for e in reader.feed(c)] + reader.finish()
    finally:
        htmlscan.ENABLED = saved
    norm = Normalizer()
    out: list[str] = []
    for ev in events:
        if isinstance(ev, Text):
            out.append(norm.feed(ev.text))
        elif isinstance(ev, Normalized):
            assert not norm.flush(), "compiled output after Python text"
            text = ev.data.decode("utf-8")
            assert len(text) == ev.chars
            out.append(text)
        else:
            assert isinstance(ev, Break)
            out.append(norm.flush() + "\x00")
    out.append(norm.flush())
    return re.sub("\x00+", "\x00", "".join(out)).strip("\x00"), sorted(set(reader.errors))


HTML_UTF8 = [(b"content-type", b"text/html; charset=utf-8")]


def verdicts_both_ways(engine: Engine, pieces: list[bytes]) -> list[Verdict]:
    """The Engine's verdict on a UTF-8 page fed in ``pieces``: compiled scanner, then
    Python path."""
    verdicts = []
    for compiled in (True, False):
        saved, htmlscan.ENABLED = htmlscan.ENABLED, compiled
        try:
            scan = engine.response_scanner(200, HTML_UTF8)
            for piece in pieces:
                scan.feed(piece)
            verdicts.append(scan.finish())
        finally:
            htmlscan.ENABLED = saved
    return verdicts


PIECES = [
    # markup
    "<p>", "</p>", "<br>", "<br/>", "<div class=x>", "</div>", "<b>", "</b>", "<a href='/x'>",
    '<a href="a>b">', "</a>", "<span title=\"x'y\">", "<img src=x alt=\"", "<td ", "<DIV>",
    "<Title>", "<li\tid=3>", "<x-y>", "<a b='c'd>", "<a =\" x\">", "<a b= =\"c>", "<p/>",
    "<!-- c -->", "<!-->", "<!--->", "<!---->", "<!--", "-->", "--!>", "<!x>", "<?php x ?>",
    "</ x>", "</>", "<", "<3", "< p>", "<中>", "<script>", "</script>", "<script src=x>",
    "var s='<p>六合彩</p>';", "<style>", "</style >", "p{x:1}", "<noembed>", "</noembed>",
    "<scripts>", "</SCRIPT>", "<textarea>", ">", "=", "\"", "'",
    # references
    "&amp;", "&lt;p&gt;", "&#x516d;", "&#20845;", "&amp", "&notit;", "&#0;", "&#x1F600;",
    "&nbsp;", "&", "&#", "&#x", "&am", "&copy", "&AMP;", "&#xD800;", "&#12",
    # text
    "六合彩", "代開發票", "代开发票", "六 合 彩", "六*合*彩", "六\u200b合彩", "ＧＨＢ", "GHB",
    "e\u0301", "\u0301", "A\u030a", "ﬃ", "…", "㍿", "，", "。", " ", "\t", "\n", "\u3000",
    "\u00a0", "\ufeff", "hello", "World", "\u212a", "\x00", "\x01", "é", "\U00020000",
    "가", "\u1100\u1161", "\uff76\uff9e", "ǰ", "İ", "ß", "\u0345", "x" * 40, "・", "-",
]


HANDED_OVER = {"\x00", "\x01", "e\u0301", "\u0301", "A\u030a", "\uff76\uff9e", "\u1100\u1161",
               "\u0345"}
"""Pieces the scanner leaves to the Python path (complex characters, NUL, U+0001)."""


@st.composite
def bodies(draw: st.DrawFn, pieces: list[str] = PIECES) -> list[bytes]:
    text = "".join(draw(st.lists(st.sampled_from(pieces), max_size=40)))
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and data:  # damage: invalid bytes somewhere
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xe4\xb8", b"\xc0\xaf", b"\xed\xa0\x80",
                                                 b"\x80", b"\xf4\x90\x80\x80",
                                                 b"\xe0\x80\x80", b"\xef\xbf"])) + data[at:]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@settings(max_examples=1500, deadline=None)
@given(chunks=bodies(), charset=st.sampled_from(["utf-8", None]))
def test_compiled_scanner_gives_the_python_path_text(chunks: list[bytes], charset: str | None) -> None:
    assert stream(chunks, charset, True) == stream(chunks, charset, False)


@settings(max_examples=1500, deadline=None)
@given(chunks=bodies([p for p in PIECES if p not in HANDED_OVER]),
       charset=st.sampled_from(["utf-8", None]))
def test_compiled_scanner_alone_gives_the_python_path_text(chunks: list[bytes],
                                                           charset: str | None) -> None:
    assert stream(chunks, charset, True) == stream(chunks, charset, False)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), cut=st.integers(0, 400))
def test_compiled_scanner_on_garbage(data: bytes, cut: int) -> None:
    chunks = [data[:cut], data[cut:]]
    assert stream(chunks, "utf-8", True) == stream(chunks, "utf-8", False)


def test_page_of_plain_text_stays_compiled() -> None:
    page = ("<html><body>" + "<p>六合彩<b>合</b>彩 Hello ＷＯＲＬＤ</p>" * 500 + "</body></html>").encode()
    reader = Html("utf-8")
    events = reader.feed(page[:5000]) + reader.feed(page[5000:]) + reader.finish()
    assert events and all(isinstance(e, Normalized) for e in events)


@pytest.mark.parametrize("tail", ["e\u0301 x", "\x00", "<a href='" + "x" * 70000])
def test_input_it_leaves_alone_is_handed_over(tail: str) -> None:
    page = ("<p>六合" * 100 + tail + "<p>彩").encode()
    chunks = [page[:300], page[300:]]
    assert stream(chunks, "utf-8", True) == stream(chunks, "utf-8", False)


def _engine(keywords: list[str], **limits: int) -> Engine:
    rules = [KeywordRule(id=f"K{i}", category="c", keyword=k, action="block", flags=frozenset())
             for i, k in enumerate(keywords)]
    return Engine.compile(RuleSet(name="t", version=1, categories={"c": Category("block")},
                                  keywords=rules, domains=[], urls=[]),
                          limits=DecodeLimits(**limits))


_SNIPPET_KEYWORDS = ["六合彩", "代开发票", "ghb", "彩票", "一二三四五六七八九十"]
_SNIPPET_ENGINE = _engine(_SNIPPET_KEYWORDS)
_SMALL_WINDOW_ENGINE = _engine(_SNIPPET_KEYWORDS, sniff_bytes=64)
"""Chooses the charset after 64 bytes: every later piece is scanned on its own, so
matches and snippets cross pieces."""


def test_engine_verdicts_equal_on_both_paths() -> None:
    engine = _engine(["六合彩", "代开发票", "ghb", "hello world"])
    pages = [b"<p>\xe5\x85\xad<b>\xe5\x90\x88</b>\xe5\xbd\xa9</p>", "代開<i>發</i>票".encode(),
             "<div>ＧＨＢ</div>".encode(), b"<p>hello</p><p>world</p>", b"<p>hello <b>world</b>"]
    for page in pages:
        compiled, python = verdicts_both_ways(engine, [page])
        assert compiled == python, page


TRICKY = ("<p>a<!-- x --!> b<!-->c<!--->d<script>x</scrip</script >e<style>y</styles></style>f"
          "<a href='>'>g</a>&amp;h&#x516d;<!x>i<?y>j</ >k<br/>l六合彩<noembed>m</noembed\t>n"
          "<div title=\"a&quot;>\">代開<b>發</b>票</div><!-- z -- >--!><p>ＧＨＢ &amp")


@pytest.mark.parametrize("where", ["body", "comment"])
def test_every_split_point_and_byte_by_byte(where: str) -> None:
    text = TRICKY if where == "body" else "<!-- " + TRICKY
    data = text.encode()
    whole = stream([data], "utf-8", False)
    assert stream([data], "utf-8", True) == whole
    for i in range(len(data) + 1):
        assert stream([data[:i], data[i:]], "utf-8", True) == whole, i
    assert stream([data[i:i + 1] for i in range(len(data))], "utf-8", True) == whole


@pytest.mark.parametrize("rest", [
    "<p>六合彩</p>",  # UTF-8 after a long ASCII start
    "<p>e\u0301 六合彩</p>",  # a complex character after it
    "\x00<p>六合彩</p>",  # NUL: the scanner hands over while the window is held
])
@pytest.mark.parametrize("charset", ["utf-8", None])
def test_long_ascii_start_goes_on_before_the_charset_is_chosen(rest: str, charset: str | None) -> None:
    page = ("<div>" + "ascii text, " * 2000 + "</div>" + rest * 50).encode()
    for size in (5000, 7919):
        chunks = [page[i:i + size] for i in range(0, len(page), size)]
        assert stream(chunks, charset, True) == stream(chunks, charset, False)


def test_gbk_after_a_long_ascii_start_is_handed_over() -> None:
    page = b"<p>" + b"ascii " * 4000 + "<p>六合彩，代开发票</p>".encode("gb18030") * 20
    chunks = [page[i:i + 4096] for i in range(0, len(page), 4096)]
    compiled, python = stream(chunks, None, True), stream(chunks, None, False)
    assert compiled == python and "六合彩" in compiled[0]


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.sampled_from(["六合彩", "代開發票", "ＧＨＢ", "彩票", "文字", "新闻", "<p>",
                                       "</p>", "<b>", "x", " ", "，", "一二三四五六七八九十",
                                       "好" * 40, "ab" * 30]), min_size=20, max_size=120),
       cuts=st.lists(st.integers(0, 5000), max_size=4),
       engine=st.sampled_from([_SNIPPET_ENGINE, _SMALL_WINDOW_ENGINE]))
def test_snippets_from_utf8_equal_the_character_path(words: list[str], cuts: list[int],
                                                     engine: Engine) -> None:
    # Pages long enough for the UTF-8 snippet path (over SNIPPET_TAIL characters), hits
    # near both ends and across pieces (which take the character path).
    page = "".join(words).encode()
    bounds = sorted({c % (len(page) + 1) for c in cuts})
    pieces = [page[a:b] for a, b in zip([0, *bounds], [*bounds, len(page)])]
    compiled, python = verdicts_both_ways(engine, pieces)
    assert compiled == python


def test_snippet_reaches_back_into_the_previous_piece() -> None:
    # The first piece is past the sniff window (16 KiB), so it is scanned on its own.
    pieces = [("<p>" + "好" * 6000).encode(), ("六合彩" + "文" * 300 + "</p>").encode()]
    compiled, python = verdicts_both_ways(_SNIPPET_ENGINE, pieces)
    assert compiled.matches[0].snippet == python.matches[0].snippet == "好" * 24 + "六合彩" + "文" * 24
