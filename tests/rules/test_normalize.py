"""rules/normalize.py: what counts as the same text."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.matcher import available_backends
from rules.normalize import (
    IGNORABLE,
    MAX_HOLDBACK,
    SEPARATORS,
    Normalizer,
    normalize,
    normalize_reference,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("押 大 小", "押大小"),
        ("押*大*小", "押大小"),
        ("押\u3000大\u00a0小", "押大小"),
        ("六\u200b合\u200c彩\u200d", "六合彩"),
        ("六\u2060合\ufeff彩", "六合彩"),
        ("六\u00ad合彩", "六合彩"),
        ("ＧＨＢ", "ghb"),
        ("GhB", "ghb"),
        ("代開發票", "代开发票"),
        ("曲馬多", "曲马多"),
        ("六＊合＊彩", "六合彩"),  # full-width separators via NFKC
        ("六．合／彩", "六合彩"),
        ("马克·吐温・传", "马克吐温传"),
        ("Straße", "strasse"),
        ("①②", "12"),
        ("ﬁ", "fi"),
        ("e\u0301", "é"),
        ("ｶﾞ", "ガ"),
        ("薴", "苎"),  # an OpenCC chain, followed to its end
        ("a\ud800b", "a\ufffdb"),
        ("", ""),
    ],
)
def test_examples(text: str, want: str) -> None:
    assert normalize(text) == want


@pytest.mark.parametrize("sep", sorted(SEPARATORS))
def test_every_separator_is_ignored_between_characters(sep: str) -> None:
    assert normalize(f"押{sep}大{sep}{sep}小") == "押大小"


@pytest.mark.parametrize("punct", list("，。、；：！？“”‘’（）【】《》「」—") + ['"', "'", "(", ")", ",", "!"])
def test_sentence_punctuation_is_not_ignorable(punct: str) -> None:
    out = normalize(f"菠菜{punct}网站")
    assert out != "菠菜网站" and "菠菜网站" not in out


def test_ellipsis_is_three_full_stops_and_so_ignorable() -> None:
    # NFKC makes U+2026 "...", and "." is a separator: the spec's order of steps.
    assert normalize("菠菜…网站") == "菠菜网站"


def test_every_unicode_space_is_ignorable() -> None:
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    assert all(s in IGNORABLE for s in spaces)
    assert normalize("a" + "".join(spaces) + "b") == "ab"


def test_fast_path_equals_the_reference_on_corpus_texts(corpus: Path) -> None:
    texts = []
    for p in sorted((corpus / "http").glob("*.http")):
        body = p.read_bytes().split(b"\r\n\r\n", 1)[-1]
        for enc in ("utf-8", "gb18030"):
            try:
                texts.append(body.decode(enc))
                break
            except UnicodeDecodeError:
                continue
    assert len(texts) > 100
    for t in texts:
        assert normalize(t) == normalize_reference(t)


def test_corpus_keywords_all_survive_normalisation(corpus: Path) -> None:
    lines = (corpus / "rules" / "keywords.tsv").read_text("utf-8").splitlines()[1:]
    for line in lines:
        kw = line.split("\t")[2]
        assert normalize(kw), kw
        assert normalize(normalize(kw)) == normalize(kw)


def test_long_text_with_one_combining_mark_takes_the_cluster_path() -> None:
    text = "中文" * 5000 + "E\u0301" + "Ａ" * 100
    assert normalize(text) == normalize_reference(text) == "中文" * 5000 + "é" + "a" * 100


def test_dense_combining_marks_fall_back_to_the_reference() -> None:
    text = "ạ\u0301" * 500
    assert normalize(text) == normalize_reference(text)


# ----------------------------------------------------------------- properties

# Characters that exercise every path: ASCII, CJK (simplified and traditional),
# full-width, ignorables, combining marks, Hangul jamo, astral, surrogates.
TRICKY = (
    "aAzZ09 .-*_\t\n押大小六合彩代開發票后後乾干著薴"
    "ＡＺ０＊．，。！？\u3000\u00a0\u200b\u200d\ufeff\u00ad·•"
    "e\u0301\u0300\u0323\u0308ǰİßς\u1100\u1161\u11a8가ｶﾞﾟ\uff9e"
    "𠮷𝐀\U000e0041\ufe0f①ﬁ\ud800"
)
tricky_text = st.text(alphabet=st.sampled_from(TRICKY), max_size=40)
any_text = st.text(st.characters(codec=None, categories=None), max_size=60)


@given(st.one_of(tricky_text, any_text))
@settings(max_examples=400, deadline=None)
def test_never_raises_is_idempotent_and_equals_the_reference(text: str) -> None:
    out = normalize(text)
    assert normalize(out) == out
    assert out == normalize_reference(text)


@given(st.one_of(tricky_text, any_text), st.lists(st.integers(0, 60), max_size=6))
@settings(max_examples=400, deadline=None)
def test_normalizer_pieces_equal_the_whole(text: str, cuts: list[int]) -> None:
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    n = Normalizer()
    got = "".join(n.feed(p) for p in pieces) + n.flush()
    assert got == normalize(text)


NO_COMPLEX = "aAzZ09 .-*_押大小六合彩代開發票后後ＡＺ０，。\u3000\u200b·𠮷①ﬁ"


@given(st.text(alphabet=st.sampled_from(NO_COMPLEX), max_size=40), st.integers(0, 40))
@settings(max_examples=300, deadline=None)
def test_plain_normalize_is_piecewise_when_no_piece_starts_with_a_mark(text: str, cut: int) -> None:
    assert normalize(text[:cut]) + normalize(text[cut:]) == normalize(text)


def test_normalizer_holds_back_only_what_can_still_combine() -> None:
    n = Normalizer()
    assert n.feed("押大小") == "押大小"  # an ideograph ends the piece: nothing held
    assert n.feed("cafe") == "caf"  # "e" may still take an accent
    assert n.feed("\u0301!") == "é!"
    assert n.flush() == ""


def test_normalizer_holdback_is_bounded() -> None:
    n = Normalizer()
    marks = "a" + "\u0301" * (3 * MAX_HOLDBACK)
    out = n.feed(marks)
    # What is held is at most MAX_HOLDBACK input characters (the output is shorter than
    # the input it came from: "a" and its first mark compose).
    assert len(n._held) <= MAX_HOLDBACK
    rest = n.flush()
    assert out and out + rest == normalize(marks)


def test_tables_are_consistent() -> None:
    for c in IGNORABLE:
        assert normalize("x" + c + "y") == "xy", f"U+{ord(c):04X}"
    assert unicodedata.is_normalized("NFKC", normalize("ＡＢＣ代開"))


@given(st.lists(st.one_of(tricky_text, any_text), max_size=20))
@settings(max_examples=200, deadline=None)
def test_normalize_many_equals_one_by_one(texts: list[str]) -> None:
    from rules.normalize import normalize_many

    assert normalize_many(texts) == [normalize(t) for t in texts]


def test_no_combining_character_above_the_scanned_range() -> None:
    from rules.normalize import _MAX_COMBINING

    assert not [c for c in range(_MAX_COMBINING + 1, 0x110000) if unicodedata.combining(chr(c))]


# ------------------------------------------- the two ways of mapping specials

def _both_special_paths(text: str) -> tuple[str, str]:
    """normalize(text) with the Hyperscan scan + str.replace path forced for any length,
    and with the re.split path forced."""
    import rules.normalize as module

    with pytest.MonkeyPatch.context() as m:
        m.setattr(module, "SPECIAL_SCAN_MIN_BYTES", 0)
        scanned = normalize(text)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(module, "_specials_in", lambda data, t: None)
        split = normalize(text)
    return scanned, split


@given(st.one_of(tricky_text, any_text), st.integers(1, 40))
@settings(max_examples=400, deadline=None)
def test_special_scan_and_split_paths_equal_the_reference(text: str, repeat: int) -> None:
    # Repeated, a text crosses SPECIAL_SCAN_MIN_BYTES and MAX_REPLACED_SPECIALS both ways.
    text = text * repeat
    scanned, split = _both_special_paths(text)
    assert scanned == split == normalize(text) == normalize_reference(text)


needs_hyperscan = pytest.mark.skipif("hyperscan" not in available_backends(),
                                     reason="hyperscan not installed")


@needs_hyperscan
@given(st.text(alphabet=st.sampled_from(TRICKY), max_size=60))
@settings(max_examples=300, deadline=None)
def test_special_scan_finds_each_distinct_changing_character_once(text: str) -> None:
    from rules.normalize import MAX_REPLACED_SPECIALS, _get_tables, _specials_in

    t = _get_tables()
    data = text.encode("utf-8", "surrogatepass").translate(t.ascii_bytes, t.ascii_delete)
    want = {c for c in text if ord(c) >= 0x80 and c in t.mapping}
    found = _specials_in(data, t)
    if len(want) > MAX_REPLACED_SPECIALS:
        assert found is None
    else:
        assert found is not None and len(found) == len(set(found)) and set(found) == want


@needs_hyperscan
def test_a_long_page_with_few_specials_takes_the_scan_path() -> None:
    from rules.normalize import SPECIAL_SCAN_MIN_BYTES, _get_tables, _specials_in

    text = ("押大小，新闻 Forum。" * 200) + "代開發票"
    assert len(text.encode()) >= SPECIAL_SCAN_MIN_BYTES
    assert _specials_in(text.encode(), _get_tables()) is not None
    assert normalize(text) == normalize_reference(text)
    assert normalize(text).endswith("押大小,新闻forum。代开发票")


def test_normalizer_holds_marks_that_open_a_run() -> None:
    # Found by hypothesis: with no starter before them, marks were passed on at once
    # and could not reorder with the marks of the next piece.
    n = Normalizer()
    got = n.feed("\u0300") + n.feed("\uff9e") + n.flush()
    assert got == normalize("\u0300\uff9e") == "\u3099\u0300"
