"""The compiled HTML scanner: UTF-8 HTML bytes -> normalised text runs in one C pass.

Owns: building ``rules._htmlscan.Scanner`` (C, rules/_htmlscan.c) from the one definition
of each part - the markup rules of ``rules.html`` (block and raw-text element names, the
tag bound), the normalisation tables of ``rules.normalize`` (``scan_tables``) and
``html.unescape`` for character references - and saying whether it is available.

Must not: define any of that behaviour itself. ``rules.containers.Html`` drives a
scanner and hands its state to the Python path (``TextDecoder`` + ``HtmlText`` +
``Normalizer``) at the first input the scanner leaves to it (see the C source's header:
complex characters, NUL, tags that never end); tests/rules/test_htmlscan.py holds the two
paths to the same normalised text.

Why: on markup-dense pages the Python path costs per tag (``re`` spends ~0.25 µs a
match) and per pass (decode, split, join, normalise, encode: five copies of the page);
the scanner makes one pass over the bytes and gives the UTF-8 that Hyperscan scans.

``LINEWARDEN_PURE_PYTHON=1`` in the environment turns it off (for comparisons); without a
C compiler at install time the module is missing and the Python path is used.
"""

from __future__ import annotations

import html
import os
import threading

from rules.html import BLOCK_ELEMENTS, MAX_TAG_CHARS, RAW_TEXT_SKIPPED

try:
    from rules import _htmlscan
except ImportError:  # pragma: no cover - built at install when a C compiler is present
    _htmlscan = None

__all__ = ["ENABLED", "new_scanner"]

ENABLED = _htmlscan is not None and os.environ.get("LINEWARDEN_PURE_PYTHON", "") in ("", "0")
"""Whether ``rules.containers.Html`` uses the compiled scanner (tests switch it off to
exercise the Python path alone)."""

_prototype: object | None = None
_lock = threading.Lock()


def _build() -> object:
    from rules import normalize

    flags = (normalize.SCAN_CHANGES, normalize.SCAN_COMPLEX, normalize.SCAN_NON_INERT,
             normalize.SCAN_IGNORABLE)
    compiled = (_htmlscan.F_CHANGES, _htmlscan.F_COMPLEX, _htmlscan.F_NONINERT,  # type: ignore[union-attr]
                _htmlscan.F_IGNORABLE)  # type: ignore[union-attr]
    if flags != compiled:  # the table's bits are defined twice, in Python and in C
        raise RuntimeError(f"rules._htmlscan reads table flags {compiled}, scan_tables writes {flags}")
    top, blocks, repl = normalize.scan_tables()
    return _htmlscan.Scanner(  # type: ignore[union-attr]
        top=top, blocks=blocks, repl=repl, unescape=html.unescape,
        block_names=tuple(sorted(BLOCK_ELEMENTS)), raw_names=RAW_TEXT_SKIPPED,
        max_tag=MAX_TAG_CHARS)


def new_scanner() -> object | None:
    """A scanner with empty state, or None when the compiled scanner is off or missing.
    The tables are built once per process (on first use, about 50 ms after
    ``rules.normalize``'s own)."""
    global _prototype
    if not ENABLED:
        return None
    if _prototype is None:
        with _lock:
            if _prototype is None:
                _prototype = _build()
    return _prototype.fresh()  # type: ignore[attr-defined]
