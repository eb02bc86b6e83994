"""rules/ruleset.py: the rule-set directory format and its validation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rules.errors import RuleProblem, RuleSetError
from rules.ruleset import (
    MAX_KEYWORD_CHARS,
    MAX_PROBLEMS_PER_FILE,
    DomainRule,
    KeywordRule,
    UrlRule,
    check_ruleset,
    keyword_problem,
    load_ruleset,
)
from tests.conftest import CORPUS_CATEGORIES

SAMPLE = Path(__file__).resolve().parents[2] / "rules" / "sample"

TOML = 'name = "t"\nversion = 3\n' + "".join(
    f'[categories.{c}]\naction = "block"\n' for c in CORPUS_CATEGORIES
) + '[categories.watch]\naction = "log"\n'


def make(tmp_path: Path, *, toml: str = TOML, **files: str | bytes) -> Path:
    d = tmp_path / "rs"
    d.mkdir(exist_ok=True)
    (d / "ruleset.toml").write_text(toml, encoding="utf-8")
    for name, content in files.items():
        data = content.encode("utf-8") if isinstance(content, str) else content
        (d / f"{name}.tsv").write_bytes(data)
    return d


# ------------------------------------------------------------------- valid sets


def test_sample_rule_set_loads_with_every_required_category() -> None:
    rs = load_ruleset(SAMPLE)
    assert rs.version == 1
    assert set(rs.categories) >= {"gambling", "drugs", "fraud", "fake_invoice", "weapons", "doh", "bypass"}
    assert all(c.action == "block" for c in rs.categories.values())
    names = {(d.name, d.mode) for d in rs.domains}
    assert {("use-application-dns.net", "exact"), ("mask.icloud.com", "exact"),
            ("mask-h2.icloud.com", "exact"), ("dns.google", "suffix"),
            ("cloudflare-dns.com", "suffix"), ("doh.pub", "suffix"),
            ("dns.alidns.com", "suffix")} <= names
    assert {r.category for r in rs.keywords} >= {"gambling", "drugs", "fraud", "fake_invoice", "weapons"}
    assert check_ruleset(SAMPLE) == []


def test_columns_are_found_by_header_name_in_any_order(tmp_path: Path) -> None:
    d = make(tmp_path, keywords="keyword\tflags\tcategory\tid\taction\n押大小\t\tgambling\tK1\tlog\n")
    (rule,) = load_ruleset(d).keywords
    assert rule == KeywordRule("K1", "gambling", "押大小", "log", frozenset(), "押大小")


def test_action_defaults_to_the_category_and_can_be_overridden(tmp_path: Path) -> None:
    d = make(tmp_path, keywords="id\tcategory\tkeyword\taction\nA\twatch\tfoo\t\nB\twatch\tbar\tblock\n")
    assert [(r.id, r.action) for r in load_ruleset(d).keywords] == [("A", "log"), ("B", "block")]


def test_keywords_are_stored_normalised(tmp_path: Path) -> None:
    d = make(tmp_path, keywords="id\tcategory\tkeyword\nA\tgambling\t六 合 彩\nB\tfake_invoice\t代開發票\nC\tdrugs\tＧＨＢ\n")
    assert [r.normalized for r in load_ruleset(d).keywords] == ["六合彩", "代开发票", "ghb"]


def test_bom_crlf_comments_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    d = make(tmp_path, keywords=b"\xef\xbb\xbf# comment\r\n\r\nid\tcategory\tkeyword\r\n# another\r\nA\tgambling\tfoo\r\n")
    assert [r.id for r in load_ruleset(d).keywords] == ["A"]


def test_domain_and_url_rules(tmp_path: Path) -> None:
    d = make(
        tmp_path,
        domains="id\tcategory\tdomain\nD1\tgambling\tCasino.Example.:8080\nD2\tgambling\t=exact.example\n"
                "D3\tgambling\t*.sub.example\nD4\tgambling\t菠菜网站.com\n",
        urls="id\tcategory\turl\taction\nU1\tfraud\thttps://Shop.Example/a/b?x=1\tlog\n",
    )
    rs = load_ruleset(d)
    assert rs.domains == [
        DomainRule("D1", "gambling", "Casino.Example.:8080", "block", "suffix", "casino.example"),
        DomainRule("D2", "gambling", "=exact.example", "block", "exact", "exact.example"),
        DomainRule("D3", "gambling", "*.sub.example", "block", "strict-sub", "sub.example"),
        DomainRule("D4", "gambling", "菠菜网站.com", "block", "suffix", "xn--5tzm5gxtepa.com"),
    ]
    assert rs.urls == [UrlRule("U1", "fraud", "https://Shop.Example/a/b?x=1", "log", "shop.example", "/a/b",
                               "suffix", "x=1")]


def test_header_only_file_is_an_empty_list(tmp_path: Path) -> None:
    d = make(tmp_path, keywords="id\tcategory\tkeyword\taction\n")
    assert load_ruleset(d).keywords == []


# ------------------------------------------------------------ problems, one table


KW = "id\tcategory\tkeyword\taction\tflags\n"


@pytest.mark.parametrize(
    ("line", "column", "reason"),
    [
        ("B1\tgambling\t\tblock\t", 3, "empty keyword"),
        ("B1\tgambling\t   \tblock\t", 3, "keyword has only blank or invisible characters"),
        ("B1\tgambling\t\u200b\u200d\tblock\t", 3, "keyword has only blank or invisible characters"),
        ("B1\tgambling\t\u3000\tblock\t", 3, "keyword has only blank or invisible characters"),
        ("B1\tgambling\t*-*\tblock\t", 3,
         "keyword is empty after normalisation (only separators or invisible characters)"),
        ("B1\tgambling\t" + "长" * (MAX_KEYWORD_CHARS + 1) + "\tblock\t", 3,
         f"keyword is {MAX_KEYWORD_CHARS + 1} characters; at most {MAX_KEYWORD_CHARS} (a keyword is a phrase, not a text)"),
        ("B1\tgambling\ta\x01b\tblock\t", 3, "control character U+0001 in keyword"),
        ("B1\tgambling\t六\x00合\tblock\t", 3, "NUL byte"),
        ("B1\tcooking\t鸡汤\tblock\t", 2,
         "unknown category 'cooking' (ruleset.toml has: drugs, fake_invoice, fraud, gambling, watch, weapons)"),
        ("B1\tdrugs\t冰糖\tnuke\t", 4, "unknown action 'nuke' (use block or log, or leave empty)"),
        ("B1\tdrugs\t冰糖\tblock\tregex", 5, "unknown flag 'regex' (known: exact)"),
        ("B1\tdrugs\tABC\tblock\texact", 3,
         "flag 'exact' but the keyword is not in normalised form; scanned text would read it as 'abc'"),
        ("\tdrugs\t冰糖\tblock\t", 1, "empty id"),
        ("B 1\tdrugs\t冰糖\tblock\t", 1, "invalid id 'B 1': letters, digits and _ . : @ / - (at most 128)"),
        ("B1\tgambling", 0, "2 columns, expected 5 (id, category, keyword, action, flags)"),
        ("B1\tgambling\tx\tblock\t\textra", 0, "6 columns, expected 5 (id, category, keyword, action, flags)"),
        ("no-tabs-at-all", 0, "1 columns, expected 5 (id, category, keyword, action, flags)"),
    ],
)
def test_bad_keyword_line(tmp_path: Path, line: str, column: int, reason: str) -> None:
    d = make(tmp_path, keywords=KW + line + "\n")
    assert check_ruleset(d) == [RuleProblem("keywords.tsv", 2, reason, column)]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xe5\x85", "invalid UTF-8 (byte 0xe5 at offset 9)"),  # truncated sequence
        (b"\xc0\xaf", "invalid UTF-8 (byte 0xc0 at offset 9)"),  # overlong '/'
        (b"\xed\xa0\x80", "invalid UTF-8 (byte 0xed at offset 9)"),  # encoded surrogate
        (b"\xff\xfe", "invalid UTF-8 (byte 0xff at offset 9)"),
    ],
)
def test_bad_utf8_names_line_and_column(tmp_path: Path, raw: bytes, reason: str) -> None:
    d = make(tmp_path, keywords=KW.encode() + b"B1\tdrugs\t" + raw + b"\tblock\t\nB2\tdrugs\tok\tblock\t\n")
    assert check_ruleset(d) == [RuleProblem("keywords.tsv", 2, reason, 3)]


@pytest.mark.parametrize(
    ("header", "reason", "column"),
    [
        ("id\tcategory\tkeyword\ttype", "unknown column 'type' (known: id, category, keyword, action, flags) "
         "(keywords are literal; regular expressions are not supported)", 4),
        ("id\tcategory\tkeyword\tid", "column 'id' appears twice in the header", 4),
        ("id\tkeyword", "the header has no 'category' column (required: id, category, keyword)", 0),
    ],
)
def test_bad_header(tmp_path: Path, header: str, reason: str, column: int) -> None:
    d = make(tmp_path, keywords=header + "\nA\tgambling\tx\ty\n")
    assert RuleProblem("keywords.tsv", 1, reason, column) in check_ruleset(d)


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("exa mple.com", "contains a space"),
        ("bad_chars!.com", "label 'bad_chars!' has characters not allowed in a host name: '!'"),
        ("a" * 64 + ".com", "label 'aaaaaaaaaaaaaaaaaaaa'... is 64 characters; at most 63"),
        (".".join(["b" * 60] * 5) + ".com", "name is 308 characters; at most 253"),
        ("**.double-star.com", "'*' is only allowed as the whole first label ('*.name')"),
        ("*.mid.*.example.com", "'*' is only allowed as the whole first label ('*.name')"),
        ("*.", "no name after the prefix"),
        ("*", "a bare '*' would match every name"),
        ("a..b.com", "empty label ('..' or a leading dot)"),
        ("-leading-dash.com", "label '-leading-dash' starts or ends with '-'"),
        ("192.0.2.1", "an IP address, not a domain name (IP rules are not supported)"),
        ("http://with-scheme.com/path", "a URL, not a domain name (put URL rules in urls.tsv)"),
        ("xn--zz.com", "label 'xn--zz' is not valid punycode"),
        ("", "empty domain"),
    ],
)
def test_bad_domain_line(tmp_path: Path, domain: str, reason: str) -> None:
    d = make(tmp_path, domains=f"id\tcategory\tdomain\nD1\tgambling\t{domain}\n")
    assert check_ruleset(d) == [RuleProblem("domains.tsv", 2, f"malformed domain {domain[:80]!r}: {reason}", 3)]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://x.example/a", "scheme 'ftp' is not http or https"),
        ("x.example/a#frag", "contains a '#fragment', which browsers never send"),
        ("x.example/a b", "contains a space (percent-encode it as %20)"),
        ("user@x.example/a", "contains user information ('user@host')"),
        ("exa!mple.com/a", "host 'exa!mple.com': label 'exa!mple' has characters not allowed in a host name: '!'"),
    ],
)
def test_bad_url_line(tmp_path: Path, url: str, reason: str) -> None:
    d = make(tmp_path, urls=f"id\tcategory\turl\nU1\tgambling\t{url}\n")
    assert check_ruleset(d) == [RuleProblem("urls.tsv", 2, f"malformed url {url!r}: {reason}", 3)]


@pytest.mark.parametrize(
    ("toml", "reason"),
    [
        ('version = 1\n[categories.a]\naction = "block"\n', "'name' must be a non-empty string"),
        ('name = "x"\nversion = "1"\n[categories.a]\naction = "block"\n',
         "'version' must be a non-negative integer (it only grows)"),
        ('name = "x"\nversion = true\n[categories.a]\naction = "block"\n',
         "'version' must be a non-negative integer (it only grows)"),
        ('name = "x"\nversion = 1\n', 'needs at least one [categories.NAME] table with action = "block" or "log"'),
        ('name = "x"\nversion = 1\n[categories.a]\naction = "allow"\n',
         "[categories.a]: action must be \"block\" or \"log\", not 'allow'"),
        ('name = "x"\nversion = 1\n[categories.a]\naction = "block"\nlimit = 3\n',
         "[categories.a]: unknown key 'limit' (known: action, description, threshold)"),
        ('name = "x"\nversion = 1\n[categories.a]\naction = "block"\nthreshold = 0\n',
         "[categories.a]: threshold must be an integer 1-1000000, not 0"),
        ('name = "x"\nversion = 1\nextra = 1\n[categories.a]\naction = "block"\n',
         "unknown key 'extra' (known: name, version, description, categories)"),
        ('name = "x"\nversion = 1\n[categories.Bad]\naction = "block"\n',
         "[categories.Bad]: category names are lower-case letters, digits, '_' and '-'"),
    ],
)
def test_bad_ruleset_toml(tmp_path: Path, toml: str, reason: str) -> None:
    assert check_ruleset(make(tmp_path, toml=toml)) == [RuleProblem("ruleset.toml", 0, reason)]


def test_invalid_toml_names_line_and_column(tmp_path: Path) -> None:
    (p,) = check_ruleset(make(tmp_path, toml='name = "x"\nversion = = 1\n'))
    assert (p.file, p.line, p.column) == ("ruleset.toml", 2, 11)
    assert p.reason.startswith("invalid TOML: ")


def test_missing_toml_and_missing_dir(tmp_path: Path) -> None:
    (tmp_path / "rs").mkdir()
    assert check_ruleset(tmp_path / "rs") == [
        RuleProblem("ruleset.toml", 0, "missing: a rule set needs ruleset.toml (name, version, categories)")
    ]
    assert check_ruleset(tmp_path / "nope") == [
        RuleProblem(str(tmp_path / "nope"), 0, "not a directory (a rule set is a directory with ruleset.toml)")
    ]


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    assert check_ruleset(make(tmp_path, keywords="")) == [
        RuleProblem("keywords.tsv", 0, "empty file: expected a header line naming the columns "
                                       "(delete the file if the rule set has no such rules)")
    ]


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    d = make(tmp_path, keywords="id\tcategory\tkeyword\nX1\tgambling\tfoo\n",
             domains="id\tcategory\tdomain\nX1\tgambling\tfoo.example\n")
    assert check_ruleset(d) == [
        RuleProblem("domains.tsv", 2, "duplicate id 'X1' (first at keywords.tsv:2)", 1)
    ]


def test_load_raises_with_every_problem_and_never_half_loads(tmp_path: Path) -> None:
    d = make(tmp_path, keywords=KW + "A\tgambling\tok\tblock\t\nB\tcooking\tx\tblock\t\nC\tgambling\t\tblock\t\n",
             domains="id\tcategory\tdomain\nD\tgambling\t*\n")
    with pytest.raises(RuleSetError) as info:
        load_ruleset(d)
    assert [(p.file, p.line) for p in info.value.problems] == [
        ("keywords.tsv", 3), ("keywords.tsv", 4), ("domains.tsv", 2)
    ]
    assert "(and 2 more)" in str(info.value)


def test_problems_per_file_are_capped_and_counted(tmp_path: Path) -> None:
    lines = "".join(f"B{i}\tcooking\tx\n" for i in range(MAX_PROBLEMS_PER_FILE + 5))
    probs = check_ruleset(make(tmp_path, keywords="id\tcategory\tkeyword\n" + lines))
    assert len(probs) == MAX_PROBLEMS_PER_FILE + 1
    assert probs[-1] == RuleProblem("keywords.tsv", 0, f"5 more problems not shown (at most {MAX_PROBLEMS_PER_FILE} per file)")


def test_keyword_problem_is_a_plain_function() -> None:
    assert keyword_problem("押 大 小", frozenset()) == ("", "押大小")
    assert keyword_problem("押大小", frozenset({"exact"})) == ("", "押大小")


# --------------------------------------------------------- the corpus's bad files


def _manifest(corpus: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in (corpus / "bad" / "manifest.jsonl").read_text().splitlines() if x.strip()]
    return {r["file"]: r for r in rows if r["kind"] == "rules"}


CORPUS_KEYWORD_FILES = {
    # file: the (line, column) of each expected problem; None = the file loads
    "bad_utf8.tsv": [(22, 3), (23, 3), (24, 3), (25, 3)],
    "duplicate_ids.tsv": [(12, 1), (13, 1)],
    "empty_keyword.tsv": [(22, 3), (23, 3), (24, 3), (25, 3)],
    "long_keyword.tsv": "every-data-line",
    "invalid_regex.tsv": [(1, 5)],
    "wrong_columns.tsv": [(22, 0), (23, 0), (24, 0), (26, 1), (26, 2), (26, 3)],
    "unknown_values.tsv": [(22, 2), (23, 4)],
    "bom_crlf.tsv": None,
    "nul_bytes.tsv": [(22, 3)],
    "empty_file.tsv": [(0, 0)],
    "header_only.tsv": None,
    "binary_garbage.tsv": "rejected",
}


@pytest.mark.parametrize("name", sorted(CORPUS_KEYWORD_FILES))
def test_corpus_bad_keyword_files(corpus: Path, tmp_path: Path, name: str) -> None:
    manifest = _manifest(corpus)
    assert f"rules/{name}" in manifest
    d = make(tmp_path, keywords=(corpus / "bad" / "rules" / name).read_bytes())
    probs = check_ruleset(d)
    want = CORPUS_KEYWORD_FILES[name]
    if want is None:
        assert probs == []
        assert manifest[f"rules/{name}"]["expect"].startswith("accept")
    elif want == "rejected":
        assert probs and all(p.file == "keywords.tsv" for p in probs)
        assert len(probs) <= MAX_PROBLEMS_PER_FILE + 1
    elif want == "every-data-line":
        data_lines = (corpus / "bad" / "rules" / name).read_bytes().count(b"\n") - 1
        long = [p for p in probs if "at most 256" in p.reason]
        assert probs and len(long) >= 1 and len(probs) <= data_lines
        assert all(p.column == 3 for p in long)
    else:
        assert [(p.line, p.column) for p in probs] == want, probs
    if want is not None:
        with pytest.raises(RuleSetError):
            load_ruleset(d)


def _corpus_domains_to_tsv(raw: bytes) -> bytes:
    """The corpus's ``pattern<TAB>category`` lines as linewarden's domains.tsv
    (line N of the input is line N + 1 of the output)."""
    out = [b"id\tcategory\tdomain"]
    for n, line in enumerate(raw.split(b"\n")[:-1] if raw.endswith(b"\n") else raw.split(b"\n")):
        fields = line.split(b"\t")
        pattern, cat = (fields + [b""])[:2]
        if pattern and not pattern.startswith(b"*."):
            pattern = b"=" + pattern
        out.append(b"C%05d\t%s\t%s" % (n, cat or b"gambling", pattern))
    return b"\n".join(out) + b"\n"


def test_corpus_bad_domains_every_bad_line_is_reported(corpus: Path, tmp_path: Path) -> None:
    raw = (corpus / "bad" / "rules" / "bad_domains.txt").read_bytes()
    d = make(tmp_path, domains=_corpus_domains_to_tsv(raw))
    probs = check_ruleset(d)
    # Lines 21-33 of the corpus file (22-34 here) are invalid; the last is an empty pattern.
    assert [p.line for p in probs] == list(range(22, 35))
    assert all(p.reason.startswith("malformed domain") for p in probs)


def test_corpus_domains_bad_utf8(corpus: Path, tmp_path: Path) -> None:
    raw = (corpus / "bad" / "rules" / "domains_bad_utf8.txt").read_bytes()
    probs = check_ruleset(make(tmp_path, domains=_corpus_domains_to_tsv(raw)))
    assert [(p.line, p.column) for p in probs] == [(22, 3), (23, 3)]
    assert all(p.reason.startswith("invalid UTF-8") for p in probs)


def test_corpus_domains_raw_unicode_is_converted(corpus: Path, tmp_path: Path) -> None:
    raw = (corpus / "bad" / "rules" / "domains_raw_unicode.txt").read_bytes()
    rs = load_ruleset(make(tmp_path, domains=_corpus_domains_to_tsv(raw)))
    by_name = {r.name: r for r in rs.domains}
    assert by_name["xn--5tzm5gxtepa.com"].pattern == "=菠菜网站.com"
    assert by_name["www.upper-case.com"].mode == "exact"


def test_corpus_rules_load(corpus_rules: Path) -> None:
    rs = load_ruleset(corpus_rules)
    assert len(rs.keywords) == 600 and len(rs.domains) == 802


@pytest.mark.slow
def test_million_keyword_lines_load(corpus: Path, tmp_path: Path) -> None:
    script = tmp_path / "make_million_lines.py"
    shutil.copy(corpus / "bad" / "rules" / "make_million_lines.py", script)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    generated = Path(out.stdout.strip())
    d = make(tmp_path)
    generated.rename(d / "keywords.tsv")
    rs = load_ruleset(d)
    assert len(rs.keywords) == 1_000_000
    assert rs.keywords[-1].id == "M0999999"
