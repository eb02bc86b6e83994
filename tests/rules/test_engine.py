"""The Engine: one compiled rule set, every adapter's questions (rules/engine.py)."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules.engine import SAMPLE_RULES, Engine
from rules.errors import RuleSetError

RULESET = """name = "unit"
version = 7

[categories.gambling]
action = "block"

[categories.watch]
action = "log"
"""
KEYWORDS = """id\tcategory\tkeyword\taction
K1\tgambling\t六合彩\t
K2\tgambling\t押大小\t
K3\twatch\t集会\t
K4\tgambling\tcasino royale\t
"""
DOMAINS = """id\tcategory\tdomain
D1\tgambling\tcasino.example
D2\tgambling\t=exact.example
D3\tgambling\t*.sub.example
"""
URLS = """id\tcategory\turl
U1\tgambling\tforum.example/bbs/casino
"""
HTML = [(b"content-type", b"text/html; charset=utf-8")]


@pytest.fixture(scope="module", params=["hyperscan", "aho"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    d = tmp_path_factory.mktemp("rules")
    (d / "ruleset.toml").write_text(RULESET, encoding="utf-8")
    (d / "keywords.tsv").write_text(KEYWORDS, encoding="utf-8")
    (d / "domains.tsv").write_text(DOMAINS, encoding="utf-8")
    (d / "urls.tsv").write_text(URLS, encoding="utf-8")
    return Engine.from_dir(d, backend=request.param)


def page(body: str) -> bytes:
    return f"<html><body>{body}</body></html>".encode()


def test_a_keyword_in_a_page_blocks_with_rule_category_where_and_snippet(engine: Engine) -> None:
    v = engine.http_response(200, HTML, page("<p>今天开奖 六合彩 结果公布</p>"))
    assert v.action == "block"
    (m,) = v.matches
    assert (m.rule_id, m.category, m.kind, m.where) == ("K1", "gambling", "keyword", "body")
    assert m.snippet == "今天开奖六合彩结果公布"
    assert v.ruleset_version == 7


def test_a_snippet_never_crosses_a_run_break(engine: Engine) -> None:
    v = engine.http_response(200, HTML, page("<p>前一段</p><p>押大小</p><p>后一段</p>"))
    assert [m.snippet for m in v.matches] == ["押大小"]


def test_a_log_category_logs_and_block_wins_over_log(engine: Engine) -> None:
    assert engine.scan_text("明天集会").action == "log"
    assert engine.scan_text("集会 六合彩").action == "block"


def test_block_tags_split_runs_and_inline_tags_do_not(engine: Engine) -> None:
    assert engine.http_response(200, HTML, page("押<b>大</b>小")).action == "block"
    assert engine.http_response(200, HTML, page("押大<br>小")).action == "allow"
    assert engine.http_response(200, HTML, page("押大</p><p>小")).action == "allow"


def test_request_target_path_and_query_runs(engine: Engine) -> None:
    target = "/s?q=六合彩&x=1".encode()
    v = engine.http_request("GET", target, [(b"host", b"news.example")])
    assert [(m.rule_id, m.where) for m in v.matches] == [("K1", "query")]
    v = engine.http_request("GET", "/六合彩/list".encode(), [(b"host", b"news.example")])
    assert [(m.rule_id, m.where) for m in v.matches] == [("K1", "path")]
    # each query value is its own run: a keyword split over two values is no match
    v = engine.http_request("GET", "/s?a=押大&b=小".encode(), [(b"host", b"news.example")])
    assert v.action == "allow"


def test_domain_rules_on_host_sni_qname_and_cname(engine: Engine) -> None:
    assert engine.host("www.casino.example").action == "block"
    assert engine.tls("CASINO.example.").action == "block"
    assert engine.dns("exact.example").action == "block"
    assert engine.dns("www.exact.example").action == "allow"
    assert engine.dns("sub.example").action == "allow"
    assert engine.dns("a.b.sub.example:53").action == "block"
    v = engine.dns_chain(["cdn.example", "edge.casino.example"])
    assert [(m.rule_id, m.where) for m in v.matches] == [("D1", "cname")]
    assert engine.tls(None).action == "allow"


def test_url_rules_and_absolute_form(engine: Engine) -> None:
    v = engine.http_request("GET", b"/bbs/casino/1", [(b"host", b"forum.example")])
    assert [(m.rule_id, m.kind) for m in v.matches] == [("U1", "url")]
    v = engine.http_request("GET", b"http://forum.example/bbs/casino", [(b"host", b"x.example")])
    assert v.rule_ids == ("U1",)
    assert engine.http_request("GET", b"/bbs/casinos", [(b"host", b"forum.example")]).action == "allow"


def test_idn_host_is_scanned_for_keywords(engine: Engine) -> None:
    host = "www.六合彩导航.com".encode("idna")
    v = engine.http_request("GET", b"/", [(b"host", host)])
    assert [(m.rule_id, m.where) for m in v.matches] == [("K1", "host")]


def test_request_body_form_and_head_verdict(engine: Engine) -> None:
    headers = [(b"host", b"bbs.example"), (b"content-type", b"application/x-www-form-urlencoded")]
    scan = engine.request_scanner("POST", b"/post", headers)
    assert scan.head_verdict.action == "allow"
    body = "title=hi&content=" + "".join(f"%{b:02X}" for b in "押大小".encode()) + "&n="
    # the verdict is known as soon as the field is complete, before the body ends
    assert scan.feed(body.encode()).action == "block"
    assert [m.where for m in scan.finish().matches] == ["form:content"]


def test_whole_one_byte_at_a_time_and_random_pieces_agree(engine: Engine) -> None:
    body = gzip.compress(page("<div>" + "新闻" * 5000 + "六<i>合</i>彩" + "天气" * 5000 + "</div>"))
    headers = HTML + [(b"content-encoding", b"gzip")]
    whole = engine.http_response(200, headers, body)
    scan = engine.response_scanner(200, headers)
    for i in range(len(body)):
        scan.feed(body[i : i + 1])
    one_byte = scan.finish()
    rng = random.Random(5)
    scan = engine.response_scanner(200, headers)
    pos = 0
    while pos < len(body):
        step = rng.randint(1, 700)
        scan.feed(body[pos : pos + step])
        pos += step
    pieces = scan.finish()
    # The snippet's context after the match is what had arrived when it matched.
    def decision(v: object) -> tuple:
        return (v.action, v.rule_ids, [m.where for m in v.matches], v.truncated, v.errors)
    assert decision(whole) == decision(one_byte) == decision(pieces)
    assert whole.rule_ids == ("K1",)
    assert all(v.matches[0].snippet.startswith("新闻" * 12 + "六合彩") for v in (whole, one_byte, pieces))


def test_a_bomb_is_truncated_not_buffered(engine: Engine) -> None:
    bomb = gzip.compress(b"<p>" + b"a" * (64 * 2**20))
    v = engine.http_response(200, HTML + [(b"content-encoding", b"gzip")], bomb)
    assert v.truncated and v.action == "allow"


def test_the_sample_rules_compile_and_block_the_bypass_names() -> None:
    engine = Engine.from_dir(SAMPLE_RULES)
    assert engine.dns("use-application-dns.net").action == "block"
    assert engine.dns("mask.icloud.com").action == "block"
    assert engine.tls("dns.google").action == "block"
    assert engine.dns("example.org").action == "allow"


def test_a_bad_rule_set_is_refused_whole(tmp_path: Path) -> None:
    (tmp_path / "ruleset.toml").write_text(RULESET, encoding="utf-8")
    (tmp_path / "keywords.tsv").write_text(KEYWORDS + "K5\tnope\t词\t\n", encoding="utf-8")
    with pytest.raises(RuleSetError) as exc:
        Engine.from_dir(tmp_path)
    assert "keywords.tsv:6" in str(exc.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    charset=st.sampled_from(["utf-8", "gb18030", "big5", "utf-16"]),
    coding=st.sampled_from(["identity", "gzip", "deflate"]),
)
def test_a_planted_keyword_is_found_through_any_charset_and_coding(
    engine: Engine, before: str, after: str, charset: str, coding: str
) -> None:
    import zlib

    text = f"{before}\u3002六合彩\u3002{after}".replace("\x00", "")
    try:
        raw = text.encode(charset)
    except UnicodeEncodeError:
        raw = "六合彩".encode(charset)
    body = {"identity": raw, "gzip": gzip.compress(raw), "deflate": zlib.compress(raw)}[coding]
    headers = [(b"content-type", f"text/plain; charset={charset}".encode())]
    if coding != "identity":
        headers.append((b"content-encoding", coding.encode()))
    assert "K1" in engine.http_response(200, headers, body).rule_ids


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000), st.sampled_from([b"text/html", b"application/json", b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded", b""]))
def test_no_generated_input_raises_out_of_the_engine(engine: Engine, body: bytes, ctype: bytes) -> None:
    headers = [(b"content-type", ctype), (b"content-encoding", b"gzip, br")] if ctype else []
    engine.http_response(200, headers, body)
    engine.http_request("POST", body[:200] or b"/", headers, body)


def test_a_repeated_keyword_is_one_match_with_the_first_snippet(engine: Engine) -> None:
    body = "<p>首页 六合彩 一</p>" + "<p>又见六合彩，再见押大小</p>" * 500
    v = engine.http_response(200, HTML, page(body))
    assert [m.rule_id for m in v.matches] == ["K1", "K2"]
    assert v.matches[0].snippet.startswith("首页六合彩一")
    # Fed in pieces, the same matches (the first occurrence wins in both).
    scan = engine.response_scanner(200, HTML)
    data = page(body)
    for i in range(0, len(data), 997):
        scan.feed(data[i:i + 997])
    assert scan.finish().matches == v.matches
