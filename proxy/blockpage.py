"""The page a user sees when linewarden blocks an HTTP transaction.

Owns: the 451 response (RFC 7725 "An HTTP Status Code to Report Legal
Obstacles"), in Chinese and English, as a status, header list and body, and as
HTTP/1.1 wire bytes for the fast path.

Must not: decide anything (the Engine did), or echo what matched. RFC 7725
section 3 asks the response body to explain the legal demand; we name the rule
category and a reference id the user can quote to the administrator, and never
the matched keyword, domain or URL: repeating illegal text on the page would
publish it again, and would let a user probe the rule list.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

STATUS = 451
"""RFC 7725 section 3: "451 Unavailable For Legal Reasons"."""
REASON = "Unavailable For Legal Reasons"

MAX_CATEGORY_CHARS = 64
"""A category name longer than this is cut: it is a maintainer's label, and the
page must stay small whatever the rule set says."""

_PAGE = """<!DOCTYPE html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>451 访问受限 / Unavailable For Legal Reasons</title>
<style>
body{{font-family:sans-serif;max-width:40em;margin:3em auto;padding:0 1em;color:#222}}
h1{{font-size:1.4em}} .ref{{font-family:monospace;font-size:1.1em;background:#eee;padding:.1em .4em}}
</style>
</head>
<body>
<h1>此内容依法不予显示</h1>
<p>根据本单位的上网安全管理规定，您访问的内容已被拦截。</p>
<p>类别：<strong>{category}</strong></p>
<p>参考编号：<span class="ref">{reference}</span></p>
<p>如认为拦截有误，请将参考编号告知网络管理员。</p>
<hr>
<h1 lang="en">Unavailable for legal reasons</h1>
<p lang="en">This content was blocked under this organisation's internet use policy.</p>
<p lang="en">Category: <strong>{category}</strong></p>
<p lang="en">Reference: <span class="ref">{reference}</span></p>
<p lang="en">If you think this is a mistake, quote the reference to your network administrator.</p>
</body>
</html>
"""


@dataclass(frozen=True, slots=True)
class BlockPage:
    """A rendered block page."""

    status: int
    """Always ``STATUS`` (451)."""
    headers: tuple[tuple[bytes, bytes], ...]
    """Response headers, Content-Length included."""
    body: bytes
    """UTF-8 HTML."""

    def wire(self, *, keep_alive: bool = True) -> bytes:
        """The whole HTTP/1.1 response, as the fast path writes it."""
        lines = [f"HTTP/1.1 {self.status} {REASON}".encode()]
        lines += [k + b": " + v for k, v in self.headers]
        lines.append(b"Connection: " + (b"keep-alive" if keep_alive else b"close"))
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def render(category: str | None, reference: str, *, blocked_by: str | None = None) -> BlockPage:
    """The block page for a transaction blocked under ``category``.

    ``reference`` is the record's uid (what the administrator looks up).
    ``blocked_by`` is a URI naming the unit that blocks, sent as the
    ``Link: <...>; rel="blocked-by"`` header RFC 7725 section 4 recommends.
    """
    cat = (category or "policy")[:MAX_CATEGORY_CHARS]
    body = _PAGE.format(
        category=html.escape(cat, quote=True), reference=html.escape(reference, quote=True)
    ).encode("utf-8")
    headers: list[tuple[bytes, bytes]] = [
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        # Intermediaries and the browser must not keep the page for the URL.
        (b"Cache-Control", b"no-store"),
        (b"X-Linewarden-Reference", _header_safe(reference)),
    ]
    if blocked_by:
        headers.append((b"Link", b"<" + _header_safe(blocked_by) + b'>; rel="blocked-by"'))
    return BlockPage(STATUS, tuple(headers), body)


def _header_safe(value: str) -> bytes:
    """Visible ASCII only: a header value must never let CR/LF through (RFC 9110 5.5)."""
    return "".join(c for c in value if 0x20 < ord(c) < 0x7F and c not in "<>").encode("ascii")
