"""Combination and weighted phrases (phrases.tsv): rules/ruleset.py validation and the
Engine's per-message evaluation (rules/engine.py, ``PhraseTable``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rules.engine import Engine
from rules.errors import RuleSetError
from rules.ruleset import check_ruleset

RULESET = """name = "phrases"
version = 3

[categories.porn]
action = "block"
threshold = 50

[categories.gambling]
action = "block"

[categories.watch]
action = "log"
threshold = 10
"""
KEYWORDS = "id\tcategory\tkeyword\nK1\tgambling\t六合彩\n"
PHRASES = """id\tcategory\tphrase\tweight
C1\tgambling\tpoker,casino\t
C2\tgambling\t押大小,赔率,下注\t
B1\tgambling\t六合彩\t
W1\tporn\tsex,video\t30
W2\tporn\tnude\t30
W3\tporn\tbiology\t-40
W4\twatch\tprotest\t10
"""
HTML = [(b"content-type", b"text/html; charset=utf-8")]


@pytest.fixture(scope="module", params=["hyperscan", "aho"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    d = tmp_path_factory.mktemp("rules")
    (d / "ruleset.toml").write_text(RULESET, encoding="utf-8")
    (d / "keywords.tsv").write_text(KEYWORDS, encoding="utf-8")
    (d / "phrases.tsv").write_text(PHRASES, encoding="utf-8")
    return Engine.from_dir(d, backend=request.param)


def ids(v) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(m.rule_id for m in v.matches)


def test_a_combination_fires_only_when_every_part_appears(engine: Engine) -> None:
    assert engine.scan_text("poker night").action == "allow"
    v = engine.scan_text("Casino tonight, and POKER too")
    assert v.action == "block" and ids(v) == ["C1"]
    (m,) = v.matches
    assert (m.kind, m.category, m.pattern) == ("phrase", "gambling", "poker,casino")


def test_parts_are_normalised_like_keywords(engine: Engine) -> None:
    assert ids(engine.scan_text("押 大 小 的賠率，立即下注")) == ["C2"]  # spaces, traditional 賠


def test_combination_parts_may_be_in_the_target_and_the_body_of_one_message(engine: Engine) -> None:
    v = engine.http_request("POST", b"/bbs/poker", [(b"host", b"forum.example"),
                            (b"content-type", b"text/plain")], b"meet at the casino")
    assert ids(v) == ["C1"]
    # ... but not across two messages.
    assert engine.http_request("GET", b"/bbs/poker", [(b"host", b"forum.example")]).action == "allow"


def test_a_part_that_is_also_a_keyword_serves_both(engine: Engine) -> None:
    assert ids(engine.scan_text("六合彩")) == ["B1", "K1"]


def test_weights_of_distinct_phrases_sum_to_the_threshold(engine: Engine) -> None:
    assert engine.scan_text("sex video").action == "allow"  # 30 < 50
    assert engine.scan_text("nude nude nude nude").action == "allow"  # one phrase, counted once
    v = engine.scan_text("a nude in the sex video")  # 30 + 30 = 60 ≥ 50
    assert v.action == "block" and ids(v) == ["W1", "W2"]
    assert all(m.kind == "phrase" and m.snippet.startswith("[60/50]") for m in v.matches)


def test_a_negative_weight_found_first_keeps_the_sum_below(engine: Engine) -> None:
    assert engine.scan_text("biology: nude, sex video").action == "allow"  # -40 + 60 = 20


def test_weighted_log_category_logs(engine: Engine) -> None:
    v = engine.scan_text("protest")
    assert v.action == "log" and ids(v) == ["W4"]


@pytest.mark.parametrize("split", [1, 3, 7])
def test_fed_whole_or_in_pieces_same_answer(engine: Engine, split: int) -> None:
    body = "<p>a nude</p><p>then a sex</p><p>video</p><p>poker</p><i>casino</i>".encode()
    whole = engine.http_response(200, HTML, body)
    scan = engine.response_scanner(200, HTML)
    for i in range(0, len(body), split):
        scan.feed(body[i:i + split])
    pieces = scan.finish()
    assert ids(whole) == ids(pieces) == ["C1", "W1", "W2"]


def test_the_verdict_blocks_as_soon_as_a_combination_completes(engine: Engine) -> None:
    # (The decoder holds back a short tail, so each piece carries filler after its word.)
    scan = engine.response_scanner(200, [(b"content-type", b"text/plain; charset=utf-8")])
    assert scan.feed(b"poker " + b"x " * 2000).action == "allow"
    assert scan.feed(b"and casino " + b"x " * 2000).action == "block"


def test_a_rule_set_without_phrases_costs_nothing(tmp_path: Path) -> None:
    (tmp_path / "ruleset.toml").write_text(RULESET)
    (tmp_path / "keywords.tsv").write_text(KEYWORDS)
    assert Engine.from_dir(tmp_path).phrases is None


@pytest.mark.parametrize(
    "row, problem",
    [
        ("X\tgambling\tpoker,\t", "phrase 'poker,': part 2: empty keyword"),
        ("X\tgambling\t,,\t", "phrase ',,': part 1: empty keyword"),
        ("X\tgambling\t" + ",".join("abcdefghijklmnopq") + "\t", "17 parts; at most 16"),
        ("X\tgambling\tpoker\t5", "weighted phrase but category 'gambling' has no threshold"),
        ("X\tporn\tpoker\tmany", "weight 'many' is not an integer"),
        ("X\tporn\tpoker\t9999999", "weight 9999999 is beyond ±1000000"),
        ("X\tnone\tpoker\t", "unknown category 'none'"),
        ("W1\tgambling\tpoker\t", "duplicate id 'W1'"),
    ],
)
def test_bad_phrase_rows_are_reported(tmp_path: Path, row: str, problem: str) -> None:
    (tmp_path / "ruleset.toml").write_text(RULESET)
    (tmp_path / "phrases.tsv").write_text(PHRASES + row + "\n")
    problems = check_ruleset(tmp_path)
    assert len(problems) == 1 and problems[0].file == "phrases.tsv" and problems[0].line == 9
    assert problem in problems[0].reason, problems[0].reason
    with pytest.raises(RuleSetError):
        Engine.from_dir(tmp_path)
