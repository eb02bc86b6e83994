"""Body decoding: an HTTP entity body in, the text runs a person sees or a server receives
out - content codings, then charset, then container (corpus/README.md "How labels were
decided", "Decoding order of a body").

Owns: ``BodyDecoder`` (the composition), ``DecodeLimits`` (every bound of the decoding
layer, named and explained), the choice of container by media type (and by sniffing when
there is no Content-Type). Re-exports the run events ``Text``/``Break`` (defined in
``rules.containers``, whose readers make them) and the request-target helpers
``target_runs``, ``host_of`` and ``idna_text`` (``rules.target``).

Must not: raise on bad traffic (damage is recorded in ``errors``; the cap in
``truncated``), hold memory in proportion to the body, or normalise and match (the
Engine does that with ``rules.normalize``/``rules.matcher``).

Which bodies are text (``container_for``):
* HTML: ``text/html``, ``application/xhtml+xml``; XML (``*/xml``, ``+xml``) is read with
  the same tokenizer (close enough for RSS/Atom, whose CDATA holds HTML);
* form: ``application/x-www-form-urlencoded``; multipart: ``multipart/form-data``;
* JSON: ``application/json``, ``text/json``, ``+json``;
* plain: every other ``text/*`` (``text/plain``, ``text/csv``, ``text/event-stream``...);
* skipped (no runs): JavaScript and CSS (code, like ``<script>``/``<style>`` in a page),
  ``image/*``, ``video/*``, ``audio/*``, ``font/*``, ``application/octet-stream``,
  archives, PDF and every other type;
* no Content-Type (requests and responses alike): sniffed from the first 512 bytes like
  WHATWG MIME Sniffing 7.1 - HTML signatures are HTML, known binary signatures or binary
  bytes are skipped, a JSON object or array is JSON, the rest is plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rules.charset import SNIFF_BYTES
from rules.codings import DEFAULT_MAX_OUTPUT, ContentDecoder, parse_codings
from rules.containers import (
    Break,
    Event,
    FormUrlencoded,
    Html,
    JsonStrings,
    Multipart,
    PlainText,
    Text,
    is_textual,
    parse_content_type,
)
from rules.target import host_of, idna_text, target_runs

__all__ = ["BodyDecoder", "Break", "DecodeLimits", "Text", "container_for", "host_of",
           "idna_text", "sniff_media_type", "target_runs"]

SNIFF_MEDIA_BYTES = 512
"""WHATWG MIME Sniffing 7.1: the binary-byte check looks at the first 512 bytes."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds of the decoding layer; each keeps one body's cost independent of its size."""

    max_decoded_bytes: int = DEFAULT_MAX_OUTPUT
    """Decoded bytes (after content codings) scanned per body: 16 MiB holds any real page
    or post many times over, and defuses decompression bombs (a 1 GiB gzip of zeros
    stops here, ``truncated`` is set). Also bounds the work of each coding layer."""

    sniff_bytes: int = SNIFF_BYTES
    """Bytes held back to choose or check a charset before any text is produced (see
    ``rules.charset.SNIFF_BYTES``)."""

    def __post_init__(self) -> None:
        if self.max_decoded_bytes <= 0 or self.sniff_bytes <= 0:
            raise ValueError("DecodeLimits: limits must be positive")


type Container = PlainText | Html | FormUrlencoded | Multipart | JsonStrings

_HTML_START = re.compile(
    rb"\s*<(?:!doctype html|html|head|script|iframe|h1|div|font|table|a|style|title|b|"
    rb"body|br|p|!--)[ >]", re.IGNORECASE)
_JSON_START = re.compile(rb'\s*(?:\{\s*(?:"|\}|\Z)|\[\s*(?:["{\[\]0-9-]|true|false|null|\Z))')
_BINARY_MAGIC = (b"\x89PNG", b"GIF8", b"\xff\xd8\xff", b"%PDF-", b"PK\x03\x04",
                 b"\x1f\x8b", b"RIFF", b"\x00\x00\x01\x00", b"BM", b"OggS", b"fLaC",
                 b"wOFF", b"wOF2", b"\x1a\x45\xdf\xa3", b"Rar!", b"7z\xbc\xaf")
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")


def sniff_media_type(prefix: bytes) -> str:
    """A media type for a body without Content-Type (WHATWG MIME Sniffing 7.1, reduced):
    ``text/html``, ``application/octet-stream``, ``application/json`` (a body opening like
    a JSON object or array: APIs parse it as JSON whatever the header says) or
    ``text/plain``."""
    if prefix.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return "text/plain"
    if _HTML_START.match(prefix):
        return "text/html"
    if _JSON_START.match(prefix):
        return "application/json"
    if prefix.startswith(_BINARY_MAGIC) or _BINARY_BYTES.search(prefix, 0, SNIFF_MEDIA_BYTES):
        return "application/octet-stream"
    return "text/plain"


def container_for(mime: str, params: dict[str, str], limits: DecodeLimits) -> Container | None:
    """The reader for a media type, or None when the body is not text (module docstring)."""
    charset = params.get("charset")
    sniff = limits.sniff_bytes
    if mime in ("text/html", "application/xhtml+xml") or mime.endswith("xml"):
        return Html(charset, sniff_bytes=sniff)
    if mime == "application/x-www-form-urlencoded":
        return FormUrlencoded(charset, sniff_bytes=sniff)
    if mime == "multipart/form-data":
        return Multipart(params.get("boundary"), charset, sniff_bytes=sniff)
    if mime in ("application/json", "text/json", "application/x-json") or mime.endswith("+json"):
        return JsonStrings(charset, sniff_bytes=sniff)
    if is_textual(mime):
        return PlainText(charset, sniff_bytes=sniff)
    return None


class BodyDecoder:
    """Entity body (transfer coding removed) -> ``Text``/``Break`` events, incrementally.

    Never raises on bad input; memory is bounded by ``limits``, not by the body. The
    same events come out however the body is split (up to the cut of a ``Text`` into
    several ``Text`` of the same run).
    """

    def __init__(self, headers: list[tuple[bytes, bytes]], *, is_request: bool,
                 limits: DecodeLimits = DecodeLimits()) -> None:
        self.is_request = is_request
        self.limits = limits
        encodings: list[bytes] = []
        types: list[bytes] = []
        for key, value in headers:  # one pass; a repeated field is its values ", "-joined
            key = key.lower()
            if key == b"content-encoding":
                encodings.append(value)
            elif key == b"content-type":
                types.append(value)
        self._coding = ContentDecoder(parse_codings(b", ".join(encodings) if encodings else None),
                                      max_output=limits.max_decoded_bytes)
        content_type = b", ".join(types) if types else None
        self._mime, self._params = parse_content_type(content_type)
        self._sniffing = content_type is None
        self._held = b""
        self._container: Container | None = None
        if not self._sniffing:
            self._container = container_for(self._mime, self._params, limits)
        self._done = False

    @property
    def truncated(self) -> bool:
        """True when ``max_decoded_bytes`` stopped decoding: the rest was not scanned."""
        return self._coding.truncated

    @property
    def errors(self) -> list[str]:
        """Damage found so far (bad codings, charsets, JSON, multipart), as sentences."""
        found = list(self._coding.errors)
        if self._container is not None:
            found.extend(self._container.errors)
        return found

    @property
    def error_count(self) -> int:
        """``len(errors)`` without building the list (asked after every piece)."""
        container = self._container
        return len(self._coding.errors) + (len(container.errors) if container is not None else 0)

    @property
    def media_type(self) -> str:
        """The media type used to choose the reader (sniffed when there was none)."""
        return self._mime

    def feed(self, data: bytes) -> list[Event]:
        if self._done or not data:
            return []
        return self._text(self._coding.feed(data), final=False)

    def finish(self) -> list[Event]:
        if self._done:
            return []
        events = self._text(self._coding.finish(), final=True)
        self._done = True
        return events

    def _text(self, decoded: bytes, final: bool) -> list[Event]:
        if self._sniffing:
            if final and not decoded and not self._held:
                # No body at all (a GET): sniffing b"" gives text/plain, whose reader
                # would produce nothing; skip building it.
                self._mime, self._sniffing = sniff_media_type(b""), False
                return []
            self._held += decoded
            if len(self._held) < SNIFF_MEDIA_BYTES and not final:
                return []
            decoded, self._held, self._sniffing = self._held, b"", False
            self._mime = sniff_media_type(decoded)
            self._container = container_for(self._mime, {}, self.limits)
        if self._container is None:
            return []
        events = self._container.feed(decoded) if decoded else []
        if final:
            events.extend(self._container.finish())
        return events

