"""HTML -> text runs: inline vs block, raw text, comments, references, any split."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.html import MAX_TAG_CHARS, HtmlText
from tests.rules.test_decode import split_ways


def runs_of(pieces: list[str]) -> list[str]:
    """Feed pieces, join each run, drop blank runs (they can hold no keyword)."""
    html = HtmlText()
    out: list[str | None] = []
    for piece in pieces:
        out.extend(html.feed(piece))
    out.extend(html.finish())
    result, current = [], ""
    for item in [*out, None]:
        if item is None:
            if current and not current.isspace():
                result.append(current)
            current = ""
        else:
            current += item
    return result


def text_runs(doc: str) -> list[str]:
    """The runs of ``doc``, checked equal whole, char by char and in random pieces."""
    whole = runs_of([doc])
    for pieces in split_ways(doc)[1:]:
        assert runs_of(pieces) == whole, pieces
    return whole


CASES = [
    # corpus/README.md "HTML text"
    ("押<b>大</b>小", ["押大小"]),
    ("押大<br>小", ["押大", "小"]),
    ("押大</p><p>小", ["押大", "小"]),
    ("<li>押大</li><li>小</li>", ["押大", "小"]),
    ("<div>押大</div>小", ["押大", "小"]),
    ("押<!-- x -->大<wbr>小", ["押大小"]),
    ("&#x62BC;&#22823;&#X5C0F;", ["押大小"]),
    ("押&nbsp;大&amp;小&lt;&gt;", ["押\xa0大&小<>"]),
    ("<a href='x'>押</a><span class=s>大</span><font color=red>小</font>", ["押大小"]),
    ("".join(f"<{t}>{i}</{t}>" for i, t in enumerate(
        "a b i u s em strong span font small mark sub sup code kbd abbr cite ins del time"
        .split())),
     ["012345678910111213141516171819"]),
    ("<custom-el>押</custom-el><x>大</x>小", ["押大小"]),  # unknown elements render inline
    ("".join(f"<{t}>{t}" for t in "p div td th tr table h1 h6 hr img title ul ol".split()),
     "p div td th tr table h1 h6 hr img title ul ol".split()),
    # raw text and non-text
    ("a<script>var s='<p>押大小</p>';</script>b<style>p{x:'</p>'}</style>c", ["abc"]),
    ("<SCRIPT type=x>hidden</SCRIPT >shown", ["shown"]),
    ("a<scripts>b</scripts>c", ["abc"]),
    ("<noembed>fallback</noembed>x<noframes>y</noframes>z", ["xz"]),
    ("a<iframe src=x></iframe>b", ["a", "b"]),
    ('<a title="押大小" data-x=\'六合彩\'>t</a>', ["t"]),
    ('<a title="x>y" href=\'a>b\'>押</a>', ["押"]),
    ("<a b=\"c'd\" e='f\"g' h=i'j>k</a>", ["k"]),
    # comments, bogus comments, odd tags
    ("<!---->x<!-->y<!--->z<!-- a -- b --!>w", ["xyzw"]),
    ("<!DOCTYPE html><?xml version='1.0'?>t</ x>u</>v", ["tuv"]),
    ("a < b <3 c", ["a < b <3 c"]),
    ("<ſcript>x</ſcript>y", ["<ſcript>xy"]),  # tag names are ASCII: not a script
    ("<a =x>q</a>", ["q"]),
    ("<br/>1<hr/>2", ["1", "2"]),
    ("a</br>b", ["a", "b"]),
    ("a\x00b", ["ab"]),
    # character references (HTML 13.2.5.72-80)
    ("&notit; &notin; &amp &ampx &unknown;", ["¬it; ∉ & &x &unknown;"]),
    ("&#0;&#x110000;&#128;", ["\ufffd\ufffd€"]),
    ("&#x62<b></b>BC;", ["bBC;"]),  # a reference never runs across a tag
    # unfinished input
    ("<p>t</p", ["t"]),
    ("text<", ["text<"]),
    ('<a title="unterminated>text', ["text"]),
    ("x<!-- never closed", ["x"]),
    ("x<script>never closed", ["x"]),
    ("&am", ["&am"]),
]


@pytest.mark.parametrize(("doc", "expected"), CASES)
def test_text_runs(doc: str, expected: list[str]) -> None:
    assert text_runs(doc) == expected


def test_long_script_and_comment_are_skipped_with_a_bounded_carry() -> None:
    html = HtmlText()
    out = html.feed("a<script>")
    for _ in range(1000):
        out += html.feed("var x = '<p>' + 1; " * 50)
        assert len(html._carry) < 20
    out += html.feed("</script>b<!--")
    for _ in range(100):
        out += html.feed("comment -- text " * 50)
        assert len(html._carry) < 4
    out += html.feed("-->c") + html.finish()
    assert "".join(p for p in out if p) == "abc"


def test_over_long_tag_is_cut_at_its_bound() -> None:
    html = HtmlText()
    html.feed("a<img src=\"data:image/png;base64,")
    for _ in range(MAX_TAG_CHARS // 1000 + 5):
        html.feed("A" * 1000)
        assert len(html._carry) <= MAX_TAG_CHARS + 1000
    out = html.feed('">b') + html.finish()
    assert [p for p in out if p] == ["b"] and html.forced_tags == 1


def test_a_long_tag_fed_a_char_at_a_time_costs_linear_time() -> None:
    html = HtmlText()
    doc = "a<img src='data:" + "A" * (MAX_TAG_CHARS - 100) + "'>b"
    started = time.process_time()
    out = [piece for char in doc for piece in html.feed(char)] + html.finish()
    assert time.process_time() - started < 5.0
    assert out == ["a", None, "b"]


def test_data_uri_tag_within_the_bound_is_removed_whole() -> None:
    assert text_runs("x<img src='data:" + "A" * 10_000 + "'>y") == ["x", "y"]


def test_blank_runs_between_breaks_are_dropped() -> None:
    html = HtmlText()
    out = html.feed("<p>a</p>\n  \n<p>b</p>") + html.finish()
    assert out == ["a", None, "b", None]


DOC_PARTS = st.sampled_from([
    "押", "大", "小", "text ", "<b>", "</b>", "<p>", "</p>", "<br>", "<!-- c -->", "&#x62BC;",
    "&amp;", "&nbsp;", "<script>x<p></script>", "<a href='a>b'>", "</a>", "<wbr>", "<",
    " < ", "&", "<style>s</style>", "<div class=\"q\">", "</div>",
])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(DOC_PARTS, max_size=30), seed=st.integers(0, 10**6))
def test_any_split_gives_the_same_runs(parts: list[str], seed: int) -> None:
    doc = "".join(parts)
    rng = random.Random(seed)
    pieces, pos = [], 0
    while pos < len(doc):
        step = rng.randint(1, 8)
        pieces.append(doc[pos:pos + step])
        pos += step
    assert runs_of(pieces) == runs_of([doc])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(doc: str) -> None:
    runs_of([doc])
    runs_of(list(doc))


FAST_VS_REFERENCE_PARTS = st.sampled_from([
    "押", "大", " ", "\n", "<b>", "</B>", "<P>", "</p >", "<Div class=x>", "<br/>", "<p<b>>",
    "<a b=\"c>d\">", "<a b='c", "<td c= >", "<i =x>", "<x-y>", "<nav>", "<Script>", "</script>",
    "<style>", "</STYLE>", "<noembed>", "<s>", "<!--", "-->", "<!-->", "<!doctype html>",
    "<?x?>", "</>", "</ p>", "<", "&amp;", "&am", "\x00", "\x01", "<\u212aeygen>", "<dİv>",
])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(FAST_VS_REFERENCE_PARTS, max_size=40), seed=st.integers(0, 10**6))
def test_fast_splitter_gives_the_reference_splitters_runs(parts: list[str], seed: int) -> None:
    """``_FAST`` (block tags classified after the split) and ``_MARKUP`` (the reference,
    block tags inside the regex) give the same text, whole and in pieces."""
    import rules.html as module

    doc = "".join(parts)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(doc) + 1), min(len(doc) + 1, 4)))
    for pieces in ([doc], [doc[a:b] for a, b in zip([0, *cuts], [*cuts, len(doc)])]):
        html = HtmlText()
        fast = "".join(html.feed_text(p) for p in pieces) + html.finish_text()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(module, "_FOLDS_TO_ASCII", "")  # "" is in every chunk: reference path
            html = HtmlText()
            reference = "".join(html.feed_text(p) for p in pieces) + html.finish_text()
        assert fast == reference
