"""TLS ClientHello parser: SNI, ALPN and offered versions, from the client's first bytes.

Owns: reading the TLS record layer (RFC 8446 §5.1; a handshake message may be
fragmented over several records, and records over several TCP segments) far
enough to reassemble the first handshake message, and parsing that ClientHello
(RFC 8446 §4.1.2) for the extensions linewarden records: server_name (RFC 6066
§3), application_layer_protocol_negotiation (RFC 7301) and supported_versions
(RFC 8446 §4.2.1). Shared by the replay and the live proxy.
Must not: decide anything (the Engine decides on the SNI) or hold state between
calls: the caller passes all bytes seen so far and calls again when more arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rules.errors import InputError, LinewardenError

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
    msg = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            raise NeedMoreData()
        ctype, major = data[pos], data[pos + 1]
        rlen = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if ctype != HANDSHAKE or major != 3:
            raise InputError("tls", f"not a TLS handshake record (type {ctype}, version {major}.{data[pos + 2]})", pos)
        if rlen == 0 or rlen > 16384 + 2048:
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


class _Reader:
    """Bounds-checked cursor; running off the end raises ``_Short``."""

    __slots__ = ("b", "i")

    def __init__(self, b: bytes) -> None:
        self.b, self.i = b, 0

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.b):
            raise _Short(self.i)
        out = self.b[self.i : self.i + n]
        self.i += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec(self, lenbytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(lenbytes), "big"))

    def left(self) -> int:
        return len(self.b) - self.i


class _Short(Exception):
    def __init__(self, offset: int) -> None:
        self.offset = offset


def _parse_body(body: bytes, *, complete: bool) -> ClientHello:
    r = _Reader(body)
    sni: str | None = None
    alpn: list[str] = []
    versions: list[str] = []
    legacy = None
    try:
        legacy = r.u16()
        r.take(32)  # random
        if len(r.vec(1)) > 32:
            raise InputError("tls", "session_id longer than 32 bytes", 4 + 32)
        suites = r.vec(2)
        if len(suites) % 2:
            raise InputError("tls", "odd cipher_suites length", r.i)
        r.vec(1)  # compression methods
        if r.left():
            ext_len = r.u16()
            if complete and r.left() < ext_len:
                raise _Short(r.i)
            # A cut-short hello (``partial``) still yields the extensions it holds.
            exts = _Reader(r.take(min(ext_len, r.left())))
            while exts.left():
                etype = exts.u16()
                ext = exts.vec(2)
                if etype == EXT_SERVER_NAME:
                    sni = _server_name(ext)
                elif etype == EXT_ALPN:
                    alpn = _alpn(ext)
                elif etype == EXT_SUPPORTED_VERSIONS:
                    versions = _versions(ext)
    except _Short as e:
        if complete:
            raise InputError("tls", "ClientHello field runs past its end", 4 + e.offset) from None
    if not versions and legacy is not None:
        versions = [version_name(legacy)]
    return ClientHello(sni=sni, alpn=alpn, versions=versions, complete=complete)


def _server_name(ext: bytes) -> str | None:
    names = _Reader(_Reader(ext).vec(2))
    while names.left():
        kind = names.u8()
        name = names.vec(2)
        if kind == 0:  # host_name; RFC 6066: ASCII, no trailing dot
            try:
                return name.decode("ascii")
            except UnicodeDecodeError:
                raise InputError("tls", "server_name is not ASCII", None) from None
    return None


def _alpn(ext: bytes) -> list[str]:
    protos = _Reader(_Reader(ext).vec(2))
    out = []
    while protos.left():
        out.append(protos.vec(1).decode("ascii", "replace"))
    return out


def _versions(ext: bytes) -> list[str]:
    raw = _Reader(ext).vec(1)
    out = []
    for i in range(0, len(raw) - 1, 2):
        code = int.from_bytes(raw[i : i + 2], "big")
        if code & 0x0F0F == 0x0A0A and code >> 8 == code & 0xFF:
            continue  # GREASE (RFC 8701)
        out.append(version_name(code))
    return out
