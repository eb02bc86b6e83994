"""rules/domains.py: domain patterns and the suffix-walk matcher."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rules.domains import DomainMatcher, DomainPattern, canonical_host, parse_domain_pattern
from rules.ruleset import DomainRule, load_ruleset


def rule(i: int, pattern: str) -> DomainRule:
    p = parse_domain_pattern(pattern)
    return DomainRule(f"D{i}", "gambling", pattern, "block", p.mode, p.name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("casino.example", DomainPattern("casino.example", "suffix")),
        ("=casino.example", DomainPattern("casino.example", "exact")),
        ("*.casino.example", DomainPattern("casino.example", "strict-sub")),
        ("  CASINO.Example.  ", DomainPattern("casino.example", "suffix")),
        ("casino.example:8443", DomainPattern("casino.example", "suffix")),
        ("菠菜网站.com", DomainPattern("xn--5tzm5gxtepa.com", "suffix")),
        ("=ＷＷＷ.菠菜网站.com", DomainPattern("www.xn--5tzm5gxtepa.com", "exact")),
        ("_dmarc.example", DomainPattern("_dmarc.example", "suffix")),
        ("com", DomainPattern("com", "suffix")),
    ],
)
def test_parse(text: str, want: DomainPattern) -> None:
    assert parse_domain_pattern(text) == want


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("WWW.Example.COM.", "www.example.com"),
        ("example.com:443", "example.com"),
        ("菠菜网站.com", "xn--5tzm5gxtepa.com"),
        ("[2001:db8::1]:443", None),
        ("", None),
    ],
)
def test_canonical_host(host: str, want: str | None) -> None:
    assert canonical_host(host) == want


@pytest.fixture(scope="module")
def matcher() -> DomainMatcher:
    return DomainMatcher.compile([
        rule(0, "casino.example"),
        rule(1, "=exact.example"),
        rule(2, "*.wild.example"),
        rule(3, "wild.example.org"),
        rule(4, "菠菜网站.com"),
        rule(5, "=casino.example"),
    ])


@pytest.mark.parametrize(
    ("host", "ids"),
    [
        ("casino.example", ["D5", "D0"]),
        ("a.b.casino.example", ["D0"]),
        ("CASINO.example.:80", ["D5", "D0"]),
        ("xcasino.example", []),  # label prefix is no subdomain
        ("casino.example.org", []),  # other TLD
        ("exact.example", ["D1"]),
        ("www.exact.example", []),
        ("wild.example", []),  # *.name does not match the name itself
        ("a.wild.example", ["D2"]),
        ("x.y.wild.example", ["D2"]),
        ("www.菠菜网站.com", ["D4"]),
        ("www.xn--5tzm5gxtepa.com", ["D4"]),
        ("192.0.2.1", []),
        ("", []),
    ],
)
def test_match(matcher: DomainMatcher, host: str, ids: list[str]) -> None:
    assert [r.id for r in matcher.match(host)] == ids


def _dns_labels(corpus: Path) -> list[dict]:
    rows = [json.loads(x) for x in (corpus / "pcap" / "labels.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["type"] == "dns" and r["expect"] in ("block", "allow")
            and "dns:cname-chain-to-blocked" not in r["transform"]]


def test_corpus_dns_qnames(corpus: Path, corpus_rules: Path) -> None:
    m = DomainMatcher.compile(load_ruleset(corpus_rules).domains)
    labels = _dns_labels(corpus)
    assert len(labels) > 400
    wrong = [(r["qname"], r["expect"]) for r in labels
             if ("block" if m.match(r["qname"]) else "allow") != r["expect"]]
    assert not wrong


def test_lookup_is_independent_of_the_rule_count() -> None:
    rules = [DomainRule(f"D{i}", "gambling", f"site{i}.example", "block", "suffix", f"site{i}.example")
             for i in range(200_000)]
    m = DomainMatcher.compile(rules)
    hosts = [f"www.a.site{i}.example" for i in range(0, 200_000, 20)]
    start = time.perf_counter()
    for h in hosts:
        assert m.match_indices(h)
    per_lookup = (time.perf_counter() - start) / len(hosts)
    assert per_lookup < 50e-6  # a few µs here; generous for a loaded CI machine
