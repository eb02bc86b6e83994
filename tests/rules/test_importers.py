"""List importers (rules/importers.py): one parser per format, tested on its own with a
table of bad lines (STYLE.md 7), then whole hand-written samples merged into rule sets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rules.engine import Engine
from rules.importers import (
    Include,
    PhraseEntry,
    Skip,
    import_lists,
    parse_adblock_line,
    parse_domain_line,
    parse_e2guardian_line,
    parse_hosts_line,
    stable_id,
)
from rules.ruleset import load_ruleset

ROOT = Path(__file__).resolve().parents[2]

HOSTS = """# StevenBlack-style hosts file
127.0.0.1 localhost
127.0.0.1 localhost.localdomain
::1 localhost ip6-localhost ip6-loopback
0.0.0.0 0.0.0.0

# ads
0.0.0.0 ads.casino.test
0.0.0.0 tracker.casino.test track2.casino.test  # two names
127.0.0.1 Pixel.Casino.test.
192.0.2.7 redirected.test
0.0.0.0 bad_name!.test
"""
DOMAINS = """# one domain a line
casino.test
=exact.casino.test
*.sub.casino.test
! adblock-style comment
two fields.test
"""
ADBLOCK = """[Adblock Plus 2.0]
! Title: sample
||ads.casino.test^
||banner.casino.test^$important
||tp.casino.test^$third-party
||img.casino.test^$image,domain=example.org
@@||allowed.casino.test^
casino.test##.banner
||casino.test/ads/*
/banner[0-9]+/
|https://casino.test/x
"""
E2G_MAIN = """#listcategory: "Gambling"
# banned phrases
<online casino>
< poker >,<jackpot>
# weighted
<bet now><40>
<odds>,<stake><20>
<responsible gambling><-30>
.Include<weighted_extra>
.Include</nonexistent/dir/missing_list>
<unclosed
"""
E2G_EXTRA = """<free spins><25>
.Include<gambling_main>
"""


@pytest.mark.parametrize("line, entries", [
    ("0.0.0.0 a.test", ["=a.test"]),
    ("127.0.0.1\tA.Test. b.test # c", ["=a.test", "=b.test"]),
    (":: v6.test", ["=v6.test"]),
    ("# comment", None),
    ("   ", None),
])
def test_hosts_lines(line: str, entries: list[str] | None) -> None:
    got = parse_hosts_line(line)
    assert (None if got is None else [e.pattern for e in got]) == entries


@pytest.mark.parametrize("line, kind, reason", [
    ("ads.test", ValueError, "'ads.test' is not an address"),
    ("0.0.0.0", ValueError, "address without a name"),
    ("127.0.0.1 localhost", Skip, "localhost boilerplate"),
    ("10.0.0.1 x.test", Skip, "maps to 10.0.0.1 (a redirect, not a block"),
    ("0.0.0.0 -bad-.test", ValueError, ""),
])
def test_bad_hosts_lines(line: str, kind: type[Exception], reason: str) -> None:
    with pytest.raises(kind) as e:
        parse_hosts_line(line)
    assert type(e.value) is kind and reason in str(e.value)


@pytest.mark.parametrize("line, pattern", [
    ("casino.test", "casino.test"), ("=Exact.test", "=exact.test"), ("*.sub.test", "*.sub.test"),
    ("casino.test # note", "casino.test"), ("# c", None), ("! c", None), ("", None),
])
def test_domain_lines(line: str, pattern: str | None) -> None:
    got = parse_domain_line(line)
    assert (got.pattern if got else None) == pattern


@pytest.mark.parametrize("line, reason", [
    ("two fields.test", "more than one field (is this a hosts file? use --format hosts)"),
    ("http://x.test/", "a URL, not a domain name"),
])
def test_bad_domain_lines(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        parse_domain_line(line)


@pytest.mark.parametrize("line, pattern", [
    ("||ads.test^", "ads.test"), ("||Ads.Test^$important", "ads.test"),
    ("||ads.test^$document", "ads.test"), ("||ads.test", "ads.test"), ("! comment", None),
    ("[Adblock Plus 2.0]", None),
])
def test_adblock_lines(line: str, pattern: str | None) -> None:
    got = parse_adblock_line(line)
    assert (got.pattern if got else None) == pattern


@pytest.mark.parametrize("line, reason", [
    ("||ads.test^$third-party", "unsupported modifier $third-party"),
    ("||ads.test^$script,important", "unsupported modifier $script"),
    ("@@||ok.test^", "exception rule (@@)"),
    ("ads.test##.banner", "cosmetic (element hiding) rule"),
    ("||ads.test/path^", "a path or wildcard after the domain"),
    ("/ad[0-9]/", "regular expression"),
    ("|https://ads.test/", "not a ||domain^ rule"),
])
def test_adblock_lines_skipped_with_reason(line: str, reason: str) -> None:
    with pytest.raises(Skip) as e:
        parse_adblock_line(line)
    assert reason in str(e.value)


@pytest.mark.parametrize("line, entry", [
    ("<poker>", PhraseEntry("poker", None)),
    ("< poker >,<casino>", PhraseEntry("poker,casino", None)),
    ("<bet now><40>", PhraseEntry("bet now", 40)),
    ("<odds>,<stake><-20>", PhraseEntry("odds,stake", -20)),
    ("<c#><10> # trailing comment", PhraseEntry("c#", 10)),
    (".Include</etc/e2guardian/lists/x>", Include("/etc/e2guardian/lists/x")),
    ('#listcategory: "x"', None),
    ("", None),
])
def test_e2guardian_lines(line: str, entry: object) -> None:
    assert parse_e2guardian_line(line) == entry


@pytest.mark.parametrize("line, reason", [
    ("<unclosed", "expected <phrase>, <a>,<b> or <phrase><weight>"),
    ("<a> and <b>", "unexpected 'and' between <...> groups"),
    ("<a><b>", "parts of a combination are separated by ','"),
    ("<a,b>", "contains ','"),
    ("<>", "empty keyword"),
    ("<a><99999999>", "weight 99999999 is beyond"),
    (".Include", "malformed .Include"),
])
def test_bad_e2guardian_lines(line: str, reason: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_e2guardian_line(line)
    assert reason in str(e.value)


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


def test_hosts_file_becomes_exact_domain_rules_with_a_report(tmp_path: Path) -> None:
    src = write(tmp_path, "hosts", HOSTS)
    report = import_lists("hosts", [src], "ads", tmp_path / "rs")
    rs = load_ruleset(tmp_path / "rs")
    assert sorted(r.pattern for r in rs.domains) == [
        "=ads.casino.test", "=pixel.casino.test", "=track2.casino.test", "=tracker.casino.test"]
    assert all(r.mode == "exact" and r.category == "ads" for r in rs.domains)
    assert report.taken == 4 and report.added == 4 and report.version == 1
    reasons = {line: r for _, line, r in report.skipped}
    assert set(reasons) == {2, 3, 4, 5, 11, 12}
    assert "redirect" in reasons[11] and reasons[12].startswith("malformed")


def test_adblock_list_takes_whole_domains_and_reports_the_rest(tmp_path: Path) -> None:
    report = import_lists("adblock", [write(tmp_path, "easylist.txt", ADBLOCK)], "ads", tmp_path / "rs")
    rs = load_ruleset(tmp_path / "rs")
    assert sorted(r.pattern for r in rs.domains) == ["ads.casino.test", "banner.casino.test"]
    assert all(r.mode == "suffix" for r in rs.domains)
    why = [r for _, _, r in report.skipped]
    assert len(why) == 7
    assert any("$third-party" in r for r in why) and any("$image" in r for r in why)
    engine = Engine.from_dir(tmp_path / "rs")
    assert engine.dns("x.ads.casino.test").action == "block"
    assert engine.dns("tp.casino.test").action == "allow"


def test_plain_domain_list(tmp_path: Path) -> None:
    report = import_lists("domains", [write(tmp_path, "list.txt", DOMAINS)], "gambling", tmp_path / "rs")
    rs = load_ruleset(tmp_path / "rs")
    assert [r.pattern for r in rs.domains] == ["casino.test", "=exact.casino.test", "*.sub.casino.test"]
    assert [line for _, line, _ in report.skipped] == [6]


def test_e2guardian_phrases_with_includes_and_a_default_threshold(tmp_path: Path) -> None:
    main = write(tmp_path, "gambling_main", E2G_MAIN)
    write(tmp_path, "weighted_extra", E2G_EXTRA)
    report = import_lists("e2guardian", [main], "gambling", tmp_path / "rs")
    rs = load_ruleset(tmp_path / "rs")
    assert [(p.phrase, p.weight) for p in rs.phrases] == [
        ("online casino", None), ("poker,jackpot", None), ("bet now", 40), ("odds,stake", 20),
        ("responsible gambling", -30), ("free spins", 25)]
    assert rs.categories["gambling"].threshold == 50
    assert [(Path(f).name, line, r) for f, line, r in report.skipped] == [
        ("weighted_extra", 2, "include loop: gambling_main already read"),
        ("gambling_main", 10, "include not found: /nonexistent/dir/missing_list"),
        ("gambling_main", 11, "malformed: expected <phrase>, <a>,<b> or <phrase><weight>")]
    assert any("e2guardian's default naughtynesslimit" in n for n in report.notes)
    engine = Engine.from_dir(tmp_path / "rs")
    assert engine.scan_text("bet now! free spins!").action == "block"  # 40 + 25 ≥ 50
    assert engine.scan_text("bet now with responsible gambling and free spins").action == "allow"
    assert engine.scan_text("poker and jackpot").action == "block"


def test_reimport_changes_only_what_changed_and_keeps_other_rules(tmp_path: Path) -> None:
    rs_dir = tmp_path / "rs"
    rs_dir.mkdir()
    (rs_dir / "ruleset.toml").write_text('# mine\nname = "site"\nversion = 7\n\n'
                                         '[categories.ads]\naction = "log"\n')
    (rs_dir / "domains.tsv").write_text("id\tcategory\tdomain\taction\n"
                                        "mine-1\tads\thand.test\tblock\n")
    src = write(tmp_path, "hosts", "0.0.0.0 a.test\n0.0.0.0 b.test\n0.0.0.0 c.test\n")
    other = write(tmp_path, "other-hosts", "0.0.0.0 a.test\n")
    import_lists("hosts", [src, other], "ads", rs_dir)
    first = (rs_dir / "domains.tsv").read_text().splitlines()
    assert first[1] == "mine-1\tads\thand.test\tblock" and len(first) == 6
    assert load_ruleset(rs_dir).version == 8
    ids = {line.split("\t")[2]: line.split("\t")[0] for line in first[2:5]}
    assert ids["=b.test"] == stable_id("hosts", "hosts", "=b.test")

    src.write_text("0.0.0.0 a.test\n0.0.0.0 c.test\n0.0.0.0 d.test\n")  # b gone, d new
    report = import_lists("hosts", [src], "ads", rs_dir)
    second = (rs_dir / "domains.tsv").read_text().splitlines()
    assert (report.added, report.removed, report.kept) == (1, 1, 2)
    assert second[:3] == first[:3] and second[3] == first[4]  # header, mine, a, c unchanged
    assert second[4] == first[5]  # the other source's row untouched
    assert second[5].split("\t")[2] == "=d.test"
    text = (rs_dir / "ruleset.toml").read_text()
    assert text.startswith("# mine") and 'action = "log"' in text and "version = 9" in text

    report = import_lists("hosts", [src], "ads", rs_dir)  # nothing changed: version stays
    assert report.version is None and load_ruleset(rs_dir).version == 9


def test_cli_import_prints_the_report(tmp_path: Path) -> None:
    src = write(tmp_path, "easylist.txt", ADBLOCK)
    p = subprocess.run([sys.executable, "-m", "linewarden", "rules", "import", "--format", "adblock",
                        str(src), "--category", "ads", "--into", str(tmp_path / "rs")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "taken 2 entries" in p.stdout and "skipped 7 lines" in p.stdout
    assert "unsupported modifier $third-party" in p.stdout
