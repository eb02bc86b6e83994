"""TLS ClientHello parser: SNI, ALPN and offered versions, from the client's first bytes.

Owns: reading the TLS record layer (RFC 8446 §5.1; a handshake message may be
fragmented over several records, and records over several TCP segments) far
enough to reassemble the first handshake message, and parsing that ClientHello
(RFC 8446 §4.1.2) for the extensions linewarden records: server_name (RFC 6066
§3), application_layer_protocol_negotiation (RFC 7301) and supported_versions
(RFC 8446 §4.2.1). Shared by the replay and the live proxy.
Must not: decide anything (the Engine decides on the SNI) or hold state between
calls: the caller passes all bytes seen so far and calls again when more arrive.

The common case (the whole hello in its first record, well formed) is scanned by
``proxy._tlshello`` (C, proxy/_tlshello.c) when it is built; anything else, and
every error, is this module's, so there is one parser's semantics
(tests/proxy/test_tlshello_c.py checks the two agree). ``LINEWARDEN_PURE_PYTHON=1``
in the environment turns the C scan off; without a compiler it is not built.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from rules.errors import InputError, LinewardenError

try:
    from proxy import _tlshello
except ImportError:  # no compiler at install time: the Python parser does it all
    _tlshello = None  # type: ignore[assignment]

_Scan = Callable[[bytes | bytearray], tuple[str | None, list[str], list[str]] | None]
_scan: _Scan | None = (
    _tlshello.scan if _tlshello is not None and os.environ.get("LINEWARDEN_PURE_PYTHON", "") in ("", "0") else None
)
"""``proxy._tlshello.scan``, or None when the Python parser does it all (tests switch it)."""

MAX_CLIENT_HELLO_BYTES = 64 * 1024
"""Largest ClientHello we reassemble. Browsers' hellos are 0.5–2 KiB; post-quantum
key shares and ECH take them to ~2–4 KiB; session tickets can add a few KiB. The
protocol allows 16 MiB, so without a cap a client could make us buffer that much."""

HANDSHAKE, CLIENT_HELLO = 22, 1
EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS = 0, 16, 43

VERSION_NAMES = {0x0300: "SSLv3", 0x0301: "TLSv1.0", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}


class NeedMoreData(LinewardenError):
    """The bytes so far are a valid beginning of a ClientHello but not all of it."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the ClientHello offered."""

    sni: str | None
    """The host_name of the server_name extension, as sent."""
    alpn: list[str] = field(default_factory=list)
    """ALPN protocol names offered, in order."""
    versions: list[str] = field(default_factory=list)
    """Versions offered, highest preference first: supported_versions when present
    (GREASE values dropped), else the legacy_version field."""
    complete: bool = True
    """False when the hello was cut short (``partial=True``) and fields may be missing."""

    @property
    def max_version(self) -> str | None:
        """The highest version offered (``TLSv1.3``...)."""
        known = [v for v in self.versions if v in _ORDER]
        return max(known, key=_ORDER.__getitem__) if known else (self.versions[0] if self.versions else None)


_ORDER = {name: code for code, name in VERSION_NAMES.items()}


def version_name(code: int) -> str:
    return VERSION_NAMES.get(code, f"0x{code:04x}")


def looks_like_tls(data: bytes) -> bool:
    """True when ``data`` starts like a TLS handshake record (type 22, version 3.x)."""
    return len(data) >= 3 and data[0] == HANDSHAKE and data[1] == 3


def parse_client_hello(data: bytes, *, partial: bool = False) -> ClientHello:
    """Parse the ClientHello at the start of a client's byte stream.

    Raises ``NeedMoreData`` while ``data`` holds only part of it, and
    ``InputError("tls", reason, offset)`` when it is not a TLS ClientHello. With
    ``partial=True`` (the stream ended or has a gap) a truncated hello yields
    whatever was parsed, with ``complete=False``, instead of ``NeedMoreData``.
    """
    if _scan is not None:
        got = _scan(data)
        if got is not None:
            return ClientHello(*got)
    try:
        body = _handshake_body(data)
    except NeedMoreData:
        if not partial:
            raise
        body = _handshake_prefix(data)
        return _parse_body(body, complete=False)
    return _parse_body(body, complete=True)


def _handshake_body(data: bytes) -> bytes:
    """Concatenate handshake record payloads until the first message is whole."""
    if len(data) >= 9 and data[0] == HANDSHAKE and data[1] == 3 and data[5] == CLIENT_HELLO:
        # The common case, taken in one slice: the whole ClientHello in the first
        # record (every browser, curl, OpenSSL), within the limits checked below.
        rlen = (data[3] << 8) | data[4]
        mlen = (data[6] << 16) | (data[7] << 8) | data[8]
        if 4 + mlen <= rlen <= _MAX_RECORD and mlen <= MAX_CLIENT_HELLO_BYTES and len(data) >= 5 + rlen:
            return bytes(data[9 : 9 + mlen])
    msg = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            raise NeedMoreData()
        ctype, major = data[pos], data[pos + 1]
        rlen = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if ctype != HANDSHAKE or major != 3:
            raise InputError("tls", f"not a TLS handshake record (type {ctype}, version {major}.{data[pos + 2]})", pos)
        if rlen == 0 or rlen > _MAX_RECORD:
            # RFC 8446 §5.1: plaintext records are at most 2^14 bytes; zero-length
            # handshake fragments are forbidden.
            raise InputError("tls", f"bad TLS record length {rlen}", pos + 3)
        if len(data) - pos - 5 < rlen:
            raise NeedMoreData()
        msg += data[pos + 5 : pos + 5 + rlen]
        pos += 5 + rlen
        if len(msg) >= 4:
            if msg[0] != CLIENT_HELLO:
                raise InputError("tls", f"first handshake message is type {msg[0]}, not ClientHello", 5)
            mlen = int.from_bytes(msg[1:4], "big")
            if mlen > MAX_CLIENT_HELLO_BYTES:
                raise InputError("tls", f"ClientHello of {mlen} bytes (limit MAX_CLIENT_HELLO_BYTES)", 6)
            if len(msg) >= 4 + mlen:
                return bytes(msg[4 : 4 + mlen])


_MAX_RECORD = 16384 + 2048
"""Longest record payload accepted: 2^14 plaintext bytes (RFC 8446 5.1) plus the
expansion a TLS 1.2 ciphertext may have."""


def _handshake_prefix(data: bytes) -> bytes:
    """Whatever handshake bytes the records so far hold (for ``partial``)."""
    msg = bytearray()
    pos = 0
    while len(data) - pos >= 5:
        rlen = int.from_bytes(data[pos + 3 : pos + 5], "big")
        msg += data[pos + 5 : pos + 5 + rlen]
        pos += 5 + rlen
    if len(msg) < 4:
        raise InputError("tls", "stream ended before the ClientHello header", len(data))
    return bytes(msg[4:])


_EXT_HEAD = struct.Struct(">HH").unpack_from
"""An extension's type and length: one call instead of four byte reads."""

_WANTED = frozenset({EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS})


class _Short(Exception):
    def __init__(self, offset: int) -> None:
        self.offset = offset


def _parse_body(body: bytes, *, complete: bool) -> ClientHello:
    # One pass with plain index arithmetic (RFC 8446 4.1.2 field by field): it runs
    # once per TLS connection on the data path, where a cursor object's method call
    # per field costs more than the rest of the parse.
    n = len(body)
    sni: str | None = None
    alpn: list[str] = []
    versions: list[str] = []
    legacy = None
    i = 0
    try:
        if n < 2:
            raise _Short(0)
        legacy = (body[0] << 8) | body[1]
        if n < 34:
            raise _Short(2)
        i = 34  # legacy_version, random
        if i >= n:
            raise _Short(i)
        size = body[i]
        i += 1
        if i + size > n:
            raise _Short(i)
        if size > 32:
            raise InputError("tls", "session_id longer than 32 bytes", 4 + 32)
        i += size
        if i + 2 > n:
            raise _Short(i)
        size = (body[i] << 8) | body[i + 1]
        i += 2
        if i + size > n:
            raise _Short(i)
        i += size
        if size % 2:
            raise InputError("tls", "odd cipher_suites length", i)
        if i >= n:
            raise _Short(i)
        i += 1 + body[i]  # compression methods
        if i > n:
            raise _Short(n)
        if i < n:
            if i + 2 > n:
                raise _Short(i)
            ext_len = (body[i] << 8) | body[i + 1]
            i += 2
            if complete and n - i < ext_len:
                raise _Short(i)
            # A cut-short hello (``partial``) still yields the extensions it holds.
            end = i + min(ext_len, n - i)
            while i < end:
                if i + 4 > end:
                    raise _Short(i)
                etype, size = _EXT_HEAD(body, i)
                i += 4
                if i + size > end:
                    raise _Short(i)
                if etype in _WANTED:  # a hello has ~15-20 extensions; three matter here
                    if etype == EXT_SERVER_NAME:
                        sni = _server_name(body[i : i + size])
                    elif etype == EXT_ALPN:
                        alpn = _alpn(body[i : i + size])
                    else:
                        versions = _versions(body[i : i + size])
                i += size
    except _Short as e:
        if complete:
            raise InputError("tls", "ClientHello field runs past its end", 4 + e.offset) from None
    if not versions and legacy is not None:
        versions = [version_name(legacy)]
    return ClientHello(sni=sni, alpn=alpn, versions=versions, complete=complete)


def _vector(b: bytes, lenbytes: int) -> bytes:
    """The body of a vector with a ``lenbytes`` length prefix at the start of ``b``."""
    if len(b) < lenbytes:
        raise _Short(0)
    end = lenbytes + int.from_bytes(b[:lenbytes], "big")
    if end > len(b):
        raise _Short(lenbytes)
    return b[lenbytes:end]


def _server_name(ext: bytes) -> str | None:
    names = _vector(ext, 2)
    i, n = 0, len(names)
    while i < n:
        if i + 3 > n:
            raise _Short(i)
        kind, size = names[i], (names[i + 1] << 8) | names[i + 2]
        i += 3
        if i + size > n:
            raise _Short(i)
        if kind == 0:  # host_name; RFC 6066: ASCII, no trailing dot
            try:
                return names[i : i + size].decode("ascii")
            except UnicodeDecodeError:
                raise InputError("tls", "server_name is not ASCII", None) from None
        i += size
    return None


def _alpn(ext: bytes) -> list[str]:
    protos = _vector(ext, 2)
    out = []
    i, n = 0, len(protos)
    while i < n:
        end = i + 1 + protos[i]
        if end > n:
            raise _Short(i)
        out.append(protos[i + 1 : end].decode("ascii", "replace"))
        i = end
    return out


def _versions(ext: bytes) -> list[str]:
    raw = _vector(ext, 1)
    out = []
    for i in range(0, len(raw) - 1, 2):
        code = (raw[i] << 8) | raw[i + 1]
        if code & 0x0F0F == 0x0A0A and code >> 8 == code & 0xFF:
            continue  # GREASE (RFC 8701)
        out.append(VERSION_NAMES.get(code) or version_name(code))
    return out
