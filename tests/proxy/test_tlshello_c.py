"""proxy/_tlshello.c against proxy/tlshello.py: the compiled scan is a shortcut of the
Python parser, never a second opinion.

For any bytes (well-formed hellos, hellos with repeated, odd or non-ASCII
extensions, split over records, cut short, mangled), ``parse_client_hello`` gives
the same ClientHello or raises the same error (type, message, offset) with the
compiled scan in front and without it; and whatever the scan itself returns is
what the Python parser says."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import tlshello
from proxy.tlshello import ClientHello, NeedMoreData, parse_client_hello
from rules.errors import InputError
from tests.proxy.test_tlshello import ext, handmade, openssl_hello, sni_ext

SCAN = tlshello._scan

pytestmark = pytest.mark.skipif(SCAN is None, reason="proxy._tlshello is not built (or LINEWARDEN_PURE_PYTHON is set)")

Outcome = tuple[object, ...]


def outcome(data: bytes, *, partial: bool, compiled: bool) -> Outcome:
    """What ``parse_client_hello`` answers, with or without the compiled scan."""
    saved = tlshello._scan
    tlshello._scan = SCAN if compiled else None
    try:
        return ("hello", parse_client_hello(data, partial=partial))
    except (NeedMoreData, InputError) as exc:
        return (type(exc).__name__, str(exc), getattr(exc, "offset", None))
    finally:
        tlshello._scan = saved


def assert_same(data: bytes) -> None:
    for partial in (False, True):
        assert outcome(data, partial=partial, compiled=True) == outcome(data, partial=partial, compiled=False)
    got = SCAN(data)  # type: ignore[misc]
    if got is not None:
        assert ClientHello(*got) == outcome(data, partial=False, compiled=False)[1]


# -- hellos made from parts that are sometimes wrong ---------------------------------------

VERSION_CODES = st.one_of(
    st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303, 0x0304, 0x0A0A, 0x1A1A, 0xFAFA, 0x0A1A, 0x7F1C]),
    st.integers(0, 0xFFFF),
)
NAMES = st.one_of(st.from_regex(r"[a-z0-9.-]{0,30}", fullmatch=True).map(str.encode), st.binary(max_size=12))


@st.composite
def prefixed(draw: st.DrawFn, body: bytes, size: int) -> bytes:
    """``body`` behind its length (``size`` bytes), now and then a wrong length."""
    n = len(body) + draw(st.sampled_from([0] * 30 + [-1, 1, 3]))
    return max(n, 0).to_bytes(size, "big")[-size:] + body


@st.composite
def server_name_ext(draw: st.DrawFn) -> bytes:
    entries = b""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from([0, 0, 0, 1, 255]))
        entries += bytes([kind]) + draw(prefixed(draw(NAMES), 2))
    return ext(0, draw(prefixed(entries, 2)))


@st.composite
def alpn_ext(draw: st.DrawFn) -> bytes:
    protos = b"".join(draw(prefixed(draw(NAMES), 1)) for _ in range(draw(st.integers(0, 4))))
    return ext(16, draw(prefixed(protos, 2)))


@st.composite
def versions_ext(draw: st.DrawFn) -> bytes:
    codes = b"".join(struct.pack("!H", c) for c in draw(st.lists(VERSION_CODES, max_size=6)))
    if draw(st.booleans()):
        codes += b"\x03"  # an odd byte at the end
    return ext(43, draw(prefixed(codes, 1)))


EXTENSION = st.one_of(
    server_name_ext(), alpn_ext(), versions_ext(),
    st.builds(ext, st.integers(0, 0xFFFF), st.binary(max_size=40)),
)


@st.composite
def hellos(draw: st.DrawFn) -> bytes:
    """A ClientHello record stream: fields, extensions, records, cuts and flips drawn."""
    exts = b"".join(draw(st.lists(EXTENSION, max_size=8)))
    body = struct.pack("!H", draw(st.sampled_from([0x0301, 0x0303, 0x0304, 0x7F00])))
    body += os.urandom(32) + draw(prefixed(b"\x22" * draw(st.sampled_from([0, 32] * 5 + [33])), 1))
    body += draw(prefixed(b"\x13\x01" * draw(st.integers(0, 3)) + b"\x00" * draw(st.sampled_from([0] * 10 + [1])), 2))
    body += draw(prefixed(b"\x00", 1))
    if draw(st.integers(0, 9)):  # extensions are optional (RFC 8446 4.1.2: TLS 1.2 hellos may have none)
        body += draw(prefixed(exts, 2)) + draw(st.sampled_from([b"", b"", b"junk"]))
    hs = b"\x01" + (len(body) + draw(st.sampled_from([0] * 20 + [-2, 5]))).to_bytes(3, "big") + body
    step = draw(st.sampled_from([len(hs)] * 3 + [1, 7, 100]))
    data = b"".join(b"\x16\x03" + bytes([draw(st.sampled_from([1, 3]))]) + struct.pack("!H", len(hs[i:i + step]))
                    + hs[i:i + step] for i in range(0, len(hs), step))
    data += draw(st.sampled_from([b"", b"", b"\x17\x03\x03\x00\x01x"]))
    raw = bytearray(data)
    for _ in range(draw(st.sampled_from([0] * 4 + [1, 2]))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(0, len(raw)))] if draw(st.integers(0, 4)) == 0 else raw)


@settings(max_examples=800, deadline=None)
@given(hellos())
def test_compiled_scan_answers_as_the_python_parser(data: bytes) -> None:
    assert_same(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_same_answer(data: bytes) -> None:
    assert_same(b"\x16\x03\x01" + data)
    assert_same(data)


@pytest.mark.parametrize("alpn", [None, ["h2"], ["h2", "http/1.1"]])
@pytest.mark.parametrize("sni", [None, "www.bench.example", "x" * 60 + "." + "y" * 60 + ".example"])
def test_real_hellos_take_the_compiled_path(sni: str | None, alpn: list[str] | None) -> None:
    data = openssl_hello(sni, alpn)
    assert SCAN(data) is not None  # type: ignore[misc]
    assert SCAN(bytearray(data)) == SCAN(memoryview(data)) == SCAN(data)  # type: ignore[misc]
    for i in range(0, len(data) + 1, 7):  # fed a segment at a time: same answers
        assert_same(data[:i])


@pytest.mark.parametrize(
    "data",
    [
        handmade(sni_ext("é.example".encode())),  # not ASCII: the Python parser's error
        handmade(ext(16, b"\x00\x04\x03h\xff2")),  # ALPN bytes that do not decode: replaced
        handmade(sni_ext(b"a.example") + sni_ext(b"b.example")),  # the last extension counts
        handmade(ext(43, b"\x02\x1a\x1a")),  # only GREASE: the legacy version stands in
        handmade(ext(43, b"\x04\x03\x05\x12\x34")),  # unknown versions by number
        handmade(b""),
    ],
)
def test_edge_cases_same_answer(data: bytes) -> None:
    assert_same(data)


def test_pure_python_switch_turns_the_scan_off() -> None:
    code = "from proxy import tlshello; print(tlshello._scan is None)"
    env = dict(os.environ, LINEWARDEN_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
