"""Request-target and Host: the text a server receives in the URL, and the host name.

Owns: splitting a request-target (origin-form, absolute-form, authority-form, asterisk)
into path-segment runs and query-value runs, percent-decoding them as a server does,
finding the request's host, and turning punycode labels into the Unicode a user sees.

Must not: decide whether a host or URL is blocked (``rules.domains``/``rules.urls`` do),
or raise on malformed input (bad escapes stay literal, bad punycode gives None).

Rules (corpus/README.md "What is scanned"): each path segment and each query value is
its own run; escapes are percent-decoded (RFC 3986 2.1) and invalid ones left literal (as
the WHATWG URL parser leaves them); ``+`` is a space in the query only (WHATWG
application/x-www-form-urlencoded); the bytes are UTF-8 if valid, else GB18030.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

from rules.charset import decode_bytes
from rules.containers import BREAK, Event, Text

MAX_LABEL = 63
"""RFC 1035 2.3.4: a DNS label has at most 63 octets (an ACE label included)."""

_ABSOLUTE = re.compile(rb"^[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")


def _split_target(target: bytes) -> tuple[bytes | None, bytes]:
    """(authority or None, path-and-query) of a request-target (RFC 9112 3.2)."""
    found = _ABSOLUTE.match(target)
    if found is not None:
        return found.group(1), target[found.end():]
    if target.startswith(b"/"):
        return None, target
    if target == b"*":
        return None, b""
    return target, b""  # authority-form (CONNECT host:port)


def _decode(raw: bytes) -> str:
    return decode_bytes(unquote_to_bytes(raw) if b"%" in raw else raw)


def target_runs(target: bytes) -> list[Event]:
    """Path segments (``where="path"``) and query values (``where="query"``) as runs."""
    _, rest = _split_target(target)
    path, _, query = rest.partition(b"?")
    events: list[Event] = []
    for segment in path.split(b"/"):
        _add(events, "path", _decode(segment))
    for item in query.split(b"&"):
        name, eq, value = item.partition(b"=")
        # A bare item ("?term") is what the server receives as the query text: scan it.
        _add(events, "query", _decode((value if eq else name).replace(b"+", b" ")))
    return events


def _add(events: list[Event], where: str, text: str) -> None:
    if text:
        events.append(Text(where, text))
        events.append(BREAK)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _strip_authority(authority: bytes) -> str | None:
    """userinfo@host:port -> host, lower-cased, without a trailing dot or IPv6 brackets."""
    host = authority.rpartition(b"@")[2].strip()
    if host.startswith(b"["):
        host = host[1:host.find(b"]")] if b"]" in host else host[1:]
    elif host.count(b":") == 1:
        host = host.partition(b":")[0]
    text = host.decode("utf-8", "replace").lower().rstrip(".")
    return text or None


def host_of(target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The request's host: RFC 9112 3.2.2 "When an origin server receives a request with
    an absolute-form of request-target, the origin server MUST ignore the received Host
    header field (if any) and instead use the host information of the request-target"."""
    authority, _ = _split_target(target)
    if authority:
        return _strip_authority(authority)
    host = _header(headers, b"host")
    return _strip_authority(host) if host else None


def idna_text(host: str | None) -> str | None:
    """The Unicode form of the host's punycode (``xn--``) labels, joined by ``.``, for
    keyword scanning (``www.xn--fet113eb8cnrd5vcxa.com`` -> ``菠菜网站导航``). None when the
    host has no such label or one of them is not valid punycode (RFC 3492)."""
    if not host:
        return None
    labels = [label for label in host.lower().split(".") if label.startswith("xn--")]
    if not labels:
        return None
    decoded = []
    for label in labels:
        if len(label) > MAX_LABEL or not label[4:].isascii():
            return None
        try:
            decoded.append(label[4:].encode("ascii").decode("punycode"))
        except (UnicodeError, ValueError, IndexError):
            return None
    return ".".join(decoded)
