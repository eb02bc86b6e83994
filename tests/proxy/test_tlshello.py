"""Tests for proxy/tlshello.py, on ClientHellos made by OpenSSL (Python's ssl) and by hand.

Every test runs twice: with the compiled scan (proxy/_tlshello.c, when built) and with
the Python parser alone (its fallback); tests/proxy/test_tlshello_c.py compares the two."""

from __future__ import annotations

import ssl
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import tlshello
from proxy.tlshello import MAX_CLIENT_HELLO_BYTES, ClientHello, NeedMoreData, parse_client_hello
from rules.errors import InputError


@pytest.fixture(autouse=True, params=["compiled", "python"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    """The compiled scan in front of the Python parser, or the Python parser alone."""
    saved = tlshello._scan
    if request.param == "compiled" and saved is None:
        pytest.skip("proxy._tlshello is not built (or LINEWARDEN_PURE_PYTHON is set)")
    if request.param == "python":
        tlshello._scan = None
    try:
        yield request.param
    finally:
        tlshello._scan = saved


def openssl_hello(sni: str | None = "www.example.com", alpn: list[str] | None = None,
                  max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> bytes:
    """The first flight of a real TLS client (OpenSSL through ssl.MemoryBIO)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def handmade(body_exts: bytes, legacy: int = 0x0303) -> bytes:
    body = struct.pack("!H", legacy) + b"\x11" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(body_exts)) + body_exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def ext(code: int, data: bytes) -> bytes:
    return struct.pack("!HH", code, len(data)) + data


def sni_ext(name: bytes) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    return ext(0, struct.pack("!H", len(entry)) + entry)


def test_openssl_hello_sni_alpn_versions() -> None:
    h = parse_client_hello(openssl_hello("shop.example.cn", ["h2", "http/1.1"]))
    assert h.sni == "shop.example.cn"
    assert h.alpn == ["h2", "http/1.1"]
    assert "TLSv1.3" in h.versions and h.max_version == "TLSv1.3"
    assert h.complete


def test_tls12_only_client() -> None:
    h = parse_client_hello(openssl_hello("a.example", max_version=ssl.TLSVersion.TLSv1_2))
    assert h.sni == "a.example"
    assert h.max_version == "TLSv1.2"


def test_no_sni() -> None:
    assert parse_client_hello(openssl_hello(None)).sni is None


@pytest.mark.parametrize("cut", [0, 1, 3, 5, 6, 20, -1])
def test_prefix_needs_more_data(cut: int) -> None:
    data = openssl_hello("x.example")
    with pytest.raises(NeedMoreData):
        parse_client_hello(data[: cut if cut >= 0 else len(data) + cut])


def test_byte_at_a_time_same_answer() -> None:
    data = openssl_hello("bytewise.example", ["h2"])
    results = []
    for i in range(1, len(data) + 1):
        try:
            results.append(parse_client_hello(data[:i]))
        except NeedMoreData:
            continue
    assert len(results) == 1 and results[0] == parse_client_hello(data)


def test_hello_fragmented_over_several_records() -> None:
    data = openssl_hello("frag.example", ["http/1.1"])
    hs = data[5:]
    records = b"".join(b"\x16\x03\x01" + struct.pack("!H", len(hs[i : i + 50])) + hs[i : i + 50]
                       for i in range(0, len(hs), 50))
    assert parse_client_hello(records) == parse_client_hello(data)
    with pytest.raises(NeedMoreData):
        parse_client_hello(records[:-10])


def test_partial_hello_gives_what_was_seen() -> None:
    data = handmade(sni_ext(b"early.example") + ext(16, b"\x00\x03\x02h2") + ext(21, b"\x00" * 400))
    h = parse_client_hello(data[:-100], partial=True)
    assert h == ClientHello(sni="early.example", alpn=["h2"], versions=["TLSv1.2"], complete=False)


def test_grease_versions_are_dropped() -> None:
    versions = b"\x06\x1a\x1a\x03\x04\x03\x03"
    h = parse_client_hello(handmade(ext(43, versions)))
    assert h.versions == ["TLSv1.3", "TLSv1.2"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not a TLS handshake record"),
        (b"\x17\x03\x03\x00\x10" + b"\0" * 16, "not a TLS handshake record"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not ClientHello"),
        (b"\x16\x03\x01\x00\x00", "bad TLS record length"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "limit MAX_CLIENT_HELLO_BYTES"),
        (handmade(ext(0, b"\x00\x50\x00")), "runs past its end"),
        (handmade(sni_ext("é.example".encode())), "not ASCII"),
    ],
)
def test_not_tls_or_broken(data: bytes, reason: str) -> None:
    with pytest.raises(InputError, match=reason) as exc:
        parse_client_hello(data)
    assert exc.value.decoder == "tls"


def test_limit_is_above_real_hellos() -> None:
    assert len(openssl_hello("a" * 60 + ".example", ["h2", "http/1.1"])) < MAX_CLIENT_HELLO_BYTES // 16


_REAL = openssl_hello("fuzz.example", ["h2"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mangled_hellos_raise_only_typed_errors(data: st.DataObject) -> None:
    raw = bytearray(_REAL)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for partial in (False, True):
        try:
            parse_client_hello(bytes(raw[:cut]), partial=partial)
        except (NeedMoreData, InputError):
            pass
