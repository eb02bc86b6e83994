"""rules/urls.py: host + path-prefix rules."""

from __future__ import annotations

import pytest

from rules.ruleset import UrlRule
from rules.urls import ParsedUrl, UrlMatcher, canonical_path, parse_url_rule


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("shop.example/a/b", ParsedUrl("shop.example", "suffix", "/a/b", None)),
        ("https://Shop.Example:8443/a/b", ParsedUrl("shop.example", "suffix", "/a/b", None)),
        ("//shop.example/", ParsedUrl("shop.example", "suffix", "", None)),
        ("=shop.example/x?id=1", ParsedUrl("shop.example", "exact", "/x", "id=1")),
        ("*.shop.example", ParsedUrl("shop.example", "strict-sub", "", None)),
        ("shop.example/%E8%AE%BA%E5%9D%9B/", ParsedUrl("shop.example", "suffix", "/论坛/", None)),
        ("shop.example/a/../b", ParsedUrl("shop.example", "suffix", "/b", None)),
        ("shop.example/a%2Fb", ParsedUrl("shop.example", "suffix", "/a%2Fb", None)),
    ],
)
def test_parse(text: str, want: ParsedUrl) -> None:
    assert parse_url_rule(text) == want


@pytest.mark.parametrize(
    ("path", "want"),
    [("/a/./b/../c", "/a/c"), ("/a/..", "/"), ("/%41", "/A"), ("", ""), ("/a%2fb", "/a%2Fb")],
)
def test_canonical_path(path: str, want: str) -> None:
    assert canonical_path(path) == want


def rule(i: int, url: str) -> UrlRule:
    u = parse_url_rule(url)
    return UrlRule(f"U{i}", "fraud", url, "block", u.host, u.path_prefix, u.mode, u.query_prefix)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def matcher() -> UrlMatcher:
    return UrlMatcher.compile([
        rule(0, "forum.example/bbs/casino"),
        rule(1, "forum.example/dir/"),
        rule(2, "=exact.example/p"),
        rule(3, "shop.example/view?id=7"),
        rule(4, "whole.example"),
        rule(5, "forum.example/论坛"),
    ])


@pytest.mark.parametrize(
    ("host", "path", "ids"),
    [
        ("forum.example", "/bbs/casino", ["U0"]),
        ("www.forum.example", "/bbs/casino/thread-1?x=1", ["U0"]),
        ("forum.example", "/bbs/casinos", []),  # segment boundary
        ("forum.example", "/BBS/casino", []),  # the path is case-sensitive
        ("FORUM.example:80", "/bbs/casino?x", ["U0"]),
        ("forum.example", "/bbs/x/../casino", ["U0"]),
        ("forum.example", "/dir/anything", ["U1"]),
        ("forum.example", "/dir", []),
        ("exact.example", "/p/q", ["U2"]),
        ("www.exact.example", "/p", []),
        ("shop.example", "/view?id=7", ["U3"]),
        ("shop.example", "/view?id=7&x=1", ["U3"]),
        ("shop.example", "/view?id=70", []),
        ("shop.example", "/view", []),
        ("whole.example", "/anything?at=all", ["U4"]),
        ("forum.example", "/%E8%AE%BA%E5%9D%9B/1", ["U5"]),
        ("forum.example", "http://forum.example/bbs/casino", ["U0"]),
        ("other.example", "/bbs/casino", []),
    ],
)
def test_match(matcher: UrlMatcher, host: str, path: str, ids: list[str]) -> None:
    assert [r.id for r in matcher.match(host, path)] == ids
