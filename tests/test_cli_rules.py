"""linewarden/commands/rules.py: `linewarden rules check DIR`."""

from __future__ import annotations

from pathlib import Path

import pytest

from linewarden.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "rules" / "sample"


def test_check_valid_rule_set_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("linewarden-sample version 1: valid\n")
    assert "keywords.tsv: 28 rules (drugs 6, fake_invoice 5, fraud 5, gambling 7, weapons 5)" in out
    assert "domains.tsv: " in out and "doh 24" in out and "bypass 3" in out


def test_check_prints_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ruleset.toml").write_text('name = "x"\nversion = 1\n[categories.drugs]\naction = "block"\n')
    (tmp_path / "keywords.tsv").write_text("id\tcategory\tkeyword\nA\tcooking\tx\nB\tdrugs\t\n")
    (tmp_path / "domains.tsv").write_text("id\tcategory\tdomain\nA\tdrugs\t*\n")
    assert main(["rules", "check", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{tmp_path}/keywords.tsv:2:2: unknown category 'cooking' (ruleset.toml has: drugs)",
        f"{tmp_path}/keywords.tsv:3:3: empty keyword",
        f"{tmp_path}/domains.tsv:2:1: duplicate id 'A' (first at keywords.tsv:2)",
        f"{tmp_path}/domains.tsv:2:3: malformed domain '*': a bare '*' would match every name",
    ]
    assert "4 problem(s)" in captured.err


def test_check_file_level_problem_has_no_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(tmp_path)]) == 2
    assert capsys.readouterr().out == (
        f"{tmp_path}/ruleset.toml: missing: a rule set needs ruleset.toml (name, version, categories)\n"
    )


def test_check_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().out


def test_rules_without_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules"]) == 2
    assert "check" in capsys.readouterr().err
