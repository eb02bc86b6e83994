"""The labelled corpus: every HTTP message gets its labelled verdict, every bad
input a clear error or a bounded best-effort result (issue 2, "Done when")."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from linewarden.commands.scan import scan_http_file
from rules.engine import Engine

BAD_INPUT_SECONDS = 10.0
"""Wall-clock bound for one bad input: a bomb must stop at the cap, not run on."""

BAD_INPUT_RSS_GROWTH = 512 * 1024 * 1024
"""Peak-RSS growth allowed over the whole bad-input run: far below the 1 GiB bombs."""


def _labels(corpus: Path) -> list[dict]:
    lines = (corpus / "http" / "labels.jsonl").read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module", params=["hyperscan", "aho"])
def engine(request: pytest.FixtureRequest, corpus_rules: Path) -> Engine:
    return Engine.from_dir(corpus_rules, backend=request.param)


def test_every_labelled_message_gets_its_verdict(engine: Engine, corpus: Path) -> None:
    wrong = []
    for label in _labels(corpus):
        result = scan_http_file(engine, corpus / "http" / label["file"])
        got = result.get("action")
        if got != label["expect"]:
            wrong.append((label["file"], label["expect"], got, label["transform"], result))
    assert not wrong, f"{len(wrong)} wrong verdicts, first ones: {wrong[:5]}"


def test_blocked_messages_name_a_rule_of_the_planted_category(engine: Engine, corpus: Path) -> None:
    for label in _labels(corpus):
        if label["expect"] != "block" or not label.get("category"):
            continue
        result = scan_http_file(engine, corpus / "http" / label["file"])
        categories = {m["category"] for m in result["matches"]}
        assert label["category"] in categories, (label["file"], result)


def test_bad_http_inputs_end_in_a_clear_error_or_a_bounded_result(engine: Engine, corpus: Path) -> None:
    manifest = [json.loads(x) for x in (corpus / "bad" / "manifest.jsonl").read_text().splitlines() if x]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for item in manifest:
        if item["kind"] != "http":
            continue
        started = time.monotonic()
        result = scan_http_file(engine, corpus / "bad" / item["file"])
        elapsed = time.monotonic() - started
        assert elapsed < BAD_INPUT_SECONDS, (item["file"], elapsed)
        assert "action" in result or result.get("error"), (item["file"], result)
        if item["expect"] == "survive-bounded":
            assert result.get("truncated") or result.get("error"), (item["file"], result)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < BAD_INPUT_RSS_GROWTH, f"peak RSS grew by {grown / 2**20:.0f} MiB"
