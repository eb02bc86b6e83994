"""Request-target runs, the request's host, and punycode labels."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.containers import Break, Text
from rules.target import host_of, idna_text, target_runs
from tests.rules.test_decode import runs


@pytest.mark.parametrize(("target", "expected"), [
    (b"/", []),
    (b"/a/b%20c/", [("path", "a"), ("path", "b c")]),
    (b"/%E9%92%A2%E5%BC%A9/x", [("path", "钢弩"), ("path", "x")]),
    (b"/%B8%D6%E5%F3", [("path", "钢弩")]),  # GBK bytes: not UTF-8, so GB18030
    (b"/a+b?q=a+b", [("path", "a+b"), ("query", "a b")]),  # "+" is a space in the query only
    (b"/q?wd=%C7%FA%C2%ED%B6%E0&ie=gbk", [("path", "q"), ("query", "曲马多"), ("query", "gbk")]),
    (b"/s?wd=%zz%E5%85%%41&x=%E5%85", [("path", "s"), ("query", "%zz鍏%A"), ("query", "鍏")]),
    (b"/s?bare&k=&=v", [("path", "s"), ("query", "bare"), ("query", "v")]),
    (b"http://Example.com:8080/p/q?x=%E6%8A%BC", [("path", "p"), ("path", "q"), ("query", "押")]),
    (b"example.com:443", []),
    (b"*", []),
])
def test_target_runs(target: bytes, expected: list[tuple[str, str]]) -> None:
    assert runs(target_runs(target)) == expected


def test_each_segment_and_value_is_its_own_run() -> None:
    events = target_runs(b"/a/b?c=d&e=f")
    assert events == [Text("path", "a"), Break(), Text("path", "b"), Break(),
                      Text("query", "d"), Break(), Text("query", "f"), Break()]


@pytest.mark.parametrize(("target", "headers", "host"), [
    (b"/", [(b"Host", b"WWW.Example.COM")], "www.example.com"),
    (b"/", [(b"host", b"example.com.:8080")], "example.com"),
    (b"/", [(b"Host", b"[::1]:8080")], "::1"),
    (b"http://User@Abs.Example:80/x", [(b"Host", b"other.example")], "abs.example"),
    (b"example.com:443", [], "example.com"),
    (b"/", [], None),
    (b"/", [(b"Host", b"")], None),
    (b"/", [(b"Host", "菠菜.com".encode())], "菠菜.com"),
])
def test_host_of(target: bytes, headers: list[tuple[bytes, bytes]], host: str | None) -> None:
    assert host_of(target, headers) == host


@pytest.mark.parametrize(("host", "text"), [
    ("www.xn--fet113eb8cnrd5vcxa.com", "菠菜网站导航"),
    ("XN--FET113EB8CNRD5VCXA.xn--fiqs8s", "菠菜网站导航.中国"),
    ("www.example.com", None),
    (None, None),
    ("", None),
    ("xn--.com", ""),
    ("xn--999.com", None),  # not valid punycode
    ("xn--" + "a" * 70 + ".com", None),  # longer than a DNS label
    ("xn--é.com", None),
])
def test_idna_text(host: str | None, text: str | None) -> None:
    assert idna_text(host) == text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_any_target_or_host_never_raises(raw: bytes) -> None:
    target_runs(raw)
    host = host_of(raw, [(b"Host", raw)])
    idna_text(host)
    idna_text(raw.decode("latin-1"))
