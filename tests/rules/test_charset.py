"""Charsets: labels, the BOM / declared / meta / sniff order, recovery, incremental use."""

from __future__ import annotations

import pytest

from rules.charset import (
    META_PRESCAN_BYTES,
    SNIFF_BYTES,
    TextDecoder,
    bom,
    decode_bytes,
    lookup,
    prescan_meta,
    sniff,
)
from tests.rules.test_decode import split_ways

TEXT = "押大小，六合彩。繁體字 ABC"


def decode(data: bytes, declared: str | None = None, *, html: bool = False,
           sniff_bytes: int = SNIFF_BYTES) -> tuple[str, TextDecoder]:
    """Whole, byte by byte and in random pieces must agree; returns the text."""
    results = []
    for pieces in split_ways(data, seeds=[0, 1]):
        decoder = TextDecoder(declared, html=html, sniff_bytes=sniff_bytes)
        text = "".join(decoder.feed(piece) for piece in pieces) + decoder.finish()
        results.append((text, decoder.encoding, decoder.errors))
    assert all(result == results[0] for result in results)
    return results[0][0], decoder


@pytest.mark.parametrize(("label", "codec"), [
    ("utf-8", "utf-8"), ("UTF8", "utf-8"), (" \"utf-8\" ", "utf-8"),
    ("gb2312", "gb18030"), ("GBK", "gb18030"), ("x-gbk", "gb18030"), ("gb18030", "gb18030"),
    ("chinese", "gb18030"), ("big5", "big5hkscs"), ("Big5-HKSCS", "big5hkscs"),
    ("utf-16", "utf-16-le"), ("utf-16be", "utf-16-be"), ("iso-8859-1", "cp1252"),
    ("us-ascii", "cp1252"), ("shift_jis", "cp932"), ("euc-kr", "cp949"),
    ("koi8-r", "koi8-r"), ("windows-1251", "cp1251"), (b"gbk", "gb18030"),
])
def test_labels_follow_the_whatwg_table(label: str | bytes, codec: str) -> None:
    assert lookup(label) == codec


@pytest.mark.parametrize("label", [None, "", "x-no-such-charset", "utf-7", "rot13",
                                   "hex", "base64", "utf-32", "replacement"])
def test_unknown_unsafe_or_non_text_labels_are_none(label: str | None) -> None:
    assert lookup(label) is None


def test_bom_wins_over_everything() -> None:
    assert bom(b"\xef\xbb\xbfx") == ("utf-8", 3)
    assert bom(b"\xff\xfex\x00") == ("utf-16-le", 2)
    assert bom(b"\xfe\xff\x00x") == ("utf-16-be", 2)
    assert bom(b"abc") is None
    text, decoder = decode(b"\xff\xfe" + TEXT.encode("utf-16-le"), "gbk")
    assert (text, decoder.encoding) == (TEXT, "utf-16-le")
    text, _ = decode(b"\xfe\xff" + TEXT.encode("utf-16-be"))
    assert text == TEXT
    text, _ = decode(b"\xef\xbb\xbf" + TEXT.encode(), "gbk")
    assert text == TEXT


@pytest.mark.parametrize("codec", ["utf-8", "gb18030", "big5hkscs"])
def test_declared_charset_is_used(codec: str) -> None:
    text = "押大小六合彩" if codec != "big5hkscs" else "押大小六合彩繁體"
    declared = {"utf-8": "utf-8", "gb18030": "gbk", "big5hkscs": "big5"}[codec]
    assert decode(text.encode(codec), declared)[0] == text


def test_declared_charset_that_fails_is_replaced_by_the_sniffed_one() -> None:
    text, decoder = decode(b"<p>" + TEXT.encode("gb18030") + b"</p>", "utf-8")
    assert text == f"<p>{TEXT}</p>" and decoder.encoding == "gb18030"
    assert "does not decode" in decoder.errors[0]


def test_unknown_label_falls_back_to_sniffing() -> None:
    text, decoder = decode(TEXT.encode(), "x-no-such-charset")
    assert text == TEXT and decoder.encoding == "utf-8"
    assert "unknown charset label" in decoder.errors[0]


@pytest.mark.parametrize(("head", "codec"), [
    (b'<meta charset="gbk">', "gb18030"),
    (b"<META CHARSET=big5>", "big5hkscs"),
    (b'<meta http-equiv="Content-Type" content="text/html; charset=gb2312">', "gb18030"),
    (b"<meta content='text/html;charset=utf-8' http-equiv='content-type'>", "utf-8"),
    (b'<meta charset="utf-16">', "utf-8"),  # WHATWG: a prescan never yields UTF-16
    (b'<?xml version="1.0" encoding="GBK"?>', "gb18030"),
    (b'<!-- <meta charset="big5"> --><meta charset="gbk">', "gb18030"),
    (b"<p>no meta</p>", None),
    (b" " * META_PRESCAN_BYTES + b'<meta charset="gbk">', None),  # too late
])
def test_meta_prescan(head: bytes, codec: str | None) -> None:
    assert prescan_meta(head) == codec


def test_meta_is_used_for_html_only_and_after_the_content_type() -> None:
    page = b'<html><head><meta charset="gbk"></head><p>' + TEXT.encode("gb18030")
    assert decode(page, html=True)[0].endswith(TEXT)
    assert decode(page, "gbk", html=True)[0].endswith(TEXT)
    _, decoder = decode(page, html=False)
    assert decoder.encoding == "gb18030"  # not from the meta: sniffed (invalid UTF-8)


def test_meta_after_non_ascii_text_is_found_however_the_input_is_split() -> None:
    page = ("<title>" + TEXT + "</title><meta charset=big5><p>" + TEXT).encode("big5hkscs")
    text, decoder = decode(page, html=True)
    assert decoder.encoding == "big5hkscs" and text.endswith(TEXT)


def test_sniffing_prefers_valid_utf8_else_gb18030() -> None:
    assert sniff(TEXT.encode(), final=True) == "utf-8"
    assert sniff(TEXT.encode("gb18030"), final=True) == "gb18030"
    assert sniff(TEXT.encode()[:-1], final=False) == "utf-8"  # an incomplete tail is fine
    assert decode(TEXT.encode("gb18030"))[0] == TEXT


def test_gb18030_after_a_long_ascii_prefix_is_sniffed_where_it_starts() -> None:
    body = b"a" * (SNIFF_BYTES + 10) + TEXT.encode("gb18030")
    text, decoder = decode(body, sniff_bytes=SNIFF_BYTES)
    assert text.endswith(TEXT) and decoder.encoding == "gb18030" and decoder.errors == []


def test_invalid_bytes_after_real_text_become_replacement_characters() -> None:
    body = TEXT.encode() * 1000 + b"\xff\xfe bad"
    text, decoder = decode(body, "utf-8")
    assert text == TEXT * 1000 + "\ufffd\ufffd bad"
    assert "replaced with U+FFFD" in decoder.errors[-1]


def test_sniff_buffer_is_bounded() -> None:
    decoder = TextDecoder(None, sniff_bytes=100)
    assert decoder.feed(b"abc" + "押".encode() * 30) == "abc"  # ASCII at once, then held
    assert decoder.feed(b"x" * 10) == "押" * 30 + "x" * 10  # the window is full: chosen
    assert len(decoder._held) == 0
    ascii_text = b"ascii is passed at once"
    assert TextDecoder(None, sniff_bytes=100).feed(ascii_text) == ascii_text.decode()


@pytest.mark.parametrize("declared", ["utf-8", None])
def test_a_body_cut_inside_a_character_keeps_its_charset(declared: str | None) -> None:
    text, decoder = decode(TEXT.encode() + "押".encode()[:2], declared)
    assert text == TEXT + "\ufffd" and decoder.encoding == "utf-8"


@pytest.mark.parametrize(("data", "declared", "text"), [
    ("押大小".encode(), None, "押大小"),
    ("押大小".encode("gb18030"), None, "押大小"),
    ("押大小".encode("gb18030"), "gbk", "押大小"),
    ("押大小".encode(), "gbk", "押大小"),  # the declared one does not decode: sniffed
    (b"\xff\xff", None, "\ufffd\ufffd"),
    (b"", None, ""),
])
def test_decode_bytes_for_short_values(data: bytes, declared: str | None, text: str) -> None:
    assert decode_bytes(data, declared) == text


def test_label_cache_stays_bounded_past_its_size() -> None:
    import rules.charset as module

    for i in range(module.LOOKUP_CACHE_SIZE + 10):
        assert module.lookup(f"x-unknown-{i}") is None
        assert len(module._LOOKUP_CACHE) <= module.LOOKUP_CACHE_SIZE
    assert module.lookup("GBK") == "gb18030" and module.lookup(b" utf8 ") == "utf-8"
