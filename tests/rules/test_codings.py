"""Content-Encoding: every coding, stacked, incremental, bounded, and damaged streams."""

from __future__ import annotations

import gzip
import random
import time
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.codings import PROBE_BYTES, SUPPORTED, ContentDecoder, parse_codings
from tests.rules.test_decode import split_ways

TEXT = ("押大小 六合彩 " * 500).encode()
_RNG = random.Random(7)
NOISY = bytes(_RNG.choice(b"abcdefghij \n<>") for _ in range(20_000))
"""Hard to compress, so a cut stream still holds most of the text (zlib holds back the
output of an unfinished long match)."""


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "identity": lambda data: data,
}


def decode(pieces: list[bytes], codings: list[str],
           cap: int = 1 << 24) -> tuple[bytes, ContentDecoder]:
    decoder = ContentDecoder(codings, max_output=cap)
    out = b"".join(decoder.feed(piece) for piece in pieces) + decoder.finish()
    return out, decoder


def same_every_way(body: bytes, codings: list[str]) -> tuple[bytes, list[str]]:
    whole, decoder = decode([body], codings)
    for pieces in split_ways(body, seeds=[0, 1])[1:]:
        got, other = decode(pieces, codings)
        assert (got, other.errors) == (whole, decoder.errors)
    return whole, decoder.errors


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_each_coding_round_trips_fed_any_way(coding: str) -> None:
    assert same_every_way(ENCODERS[coding](TEXT), [coding]) == (TEXT, [])


def test_deflate_accepts_zlib_wrapped_and_raw() -> None:
    assert same_every_way(zlib.compress(TEXT), ["deflate"]) == (TEXT, [])
    assert same_every_way(raw_deflate(TEXT), ["deflate"]) == (TEXT, [])


@pytest.mark.skipif("zstd" not in SUPPORTED, reason="no zstd module")
def test_zstd_round_trips() -> None:
    from backports import zstd  # type: ignore[import-not-found]

    assert same_every_way(zstd.compress(TEXT), ["zstd"]) == (TEXT, [])


def test_stacked_codings_are_undone_right_to_left() -> None:
    body = brotli.compress(raw_deflate(gzip.compress(TEXT)))
    assert same_every_way(body, parse_codings(b"gzip, deflate, br")) == (TEXT, [])


def test_multi_member_gzip_is_read_to_the_end() -> None:
    assert decode([gzip.compress(b"one ") + gzip.compress(b"two")], ["gzip"])[0] == b"one two"


@pytest.mark.parametrize(("value", "codings"), [
    (None, []), (b"", []), (b"GZIP", ["gzip"]),
    (b" gzip ,br,, identity", ["gzip", "br", "identity"]),
    ("deflate", ["deflate"]),
])
def test_parse_codings(value: bytes | str | None, codings: list[str]) -> None:
    assert parse_codings(value) == codings


BOMB = gzip.compress(b"\0" * (256 * 1024 * 1024), 9)


@pytest.mark.parametrize("layers", [["gzip"], ["gzip", "gzip"]])
def test_bombs_stop_at_the_cap_quickly_and_say_truncated(layers: list[str]) -> None:
    body = BOMB if layers == ["gzip"] else gzip.compress(BOMB)
    started = time.monotonic()
    decoder = ContentDecoder(layers, max_output=1 << 20)
    total = sum(len(decoder.feed(body[i:i + 65536])) for i in range(0, len(body), 65536))
    total += len(decoder.finish())
    assert decoder.truncated and total == 1 << 20
    assert time.monotonic() - started < 2.0


def test_brotli_bomb_is_bounded_too() -> None:
    body = brotli.compress(b"\0" * (64 * 1024 * 1024), quality=5)
    decoder = ContentDecoder(["br"], max_output=100_000)
    out = decoder.feed(body) + decoder.finish()
    assert decoder.truncated and len(out) == 100_000


def test_exactly_the_cap_is_not_truncated() -> None:
    out, decoder = decode([gzip.compress(b"a" * 1000)], ["gzip"], cap=1000)
    assert len(out) == 1000 and not decoder.truncated


DAMAGED = [
    # (body, codings, expected prefix of the output, expected error fragment)
    (gzip.compress(TEXT)[:-8] + b"\0" * 8, ["gzip"], TEXT, "gzip: Error -3"),
    (gzip.compress(NOISY)[:-8] + b"\0" * 8, ["gzip"], NOISY, "gzip: Error -3"),
    (gzip.compress(NOISY)[:len(gzip.compress(NOISY)) // 2], ["gzip"], NOISY[:5000],
     "gzip: stream truncated"),
    (brotli.compress(NOISY)[:-3], ["br"], NOISY[:5000], "br: stream truncated"),
    (gzip.compress(b"abc") + b"junk", ["gzip"], b"abc", "4 bytes after the end"),
    (brotli.compress(b"abc") + b"junk", ["br"], b"abc", "4 bytes after the end"),
    (zlib.compress(b"abc") + b"junk", ["deflate"], b"abc", "4 bytes after the end"),
    (b"\x1f", ["gzip"], b"", "gzip: stream truncated"),
]


@pytest.mark.parametrize(("body", "codings", "prefix", "error"), DAMAGED)
def test_damage_keeps_the_text_before_it_and_records_an_error(
        body: bytes, codings: list[str], prefix: bytes, error: str) -> None:
    out, decoder = decode([body], codings)
    assert out.startswith(prefix)
    assert any(error in e for e in decoder.errors), decoder.errors


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_body_mislabelled_as_compressed_is_scanned_as_identity(coding: str) -> None:
    body = "<p>明文 plain text</p>".encode() * 50
    out, decoder = same_every_way(body, [coding])
    assert out == body and "scanned as identity" in decoder[0]


@pytest.mark.parametrize(("extra", "fallback"), [(100, True), (PROBE_BYTES + 3000, False)])
def test_identity_fallback_only_while_all_input_is_in_the_probe(extra: int, fallback: bool) -> None:
    # A gzip header with a long FEXTRA field (RFC 1952 2.3.1.1) produces no output, then
    # an invalid deflate block fails.
    body = (b"\x1f\x8b\x08\x04" + b"\0" * 6 + extra.to_bytes(2, "little") + b"x" * extra
            + b"\xff\xff\xff")
    out, decoder = decode(split_ways(body, seeds=[3])[2], ["gzip"])
    assert (out == body) is fallback
    assert ("scanned as identity" in decoder.errors[0]) is fallback


def test_unknown_coding_is_recorded_and_passed_through() -> None:
    out, decoder = decode([b"plain"], ["x-compress"])
    assert out == b"plain" and "unknown content-coding 'x-compress'" in decoder.errors[0]


def test_feed_after_finish_gives_nothing() -> None:
    decoder = ContentDecoder(["gzip"])
    decoder.feed(gzip.compress(b"x"))
    decoder.finish()
    assert decoder.feed(b"more") == b""


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300),
       codings=st.lists(st.sampled_from(["gzip", "deflate", "br", "identity", "zstd", "x"]),
                        max_size=3))
def test_garbage_never_raises(body: bytes, codings: list[str]) -> None:
    decoder = ContentDecoder(codings, max_output=10_000)
    out = decoder.feed(body) + decoder.finish()
    assert len(out) <= 10_000
