"""`linewarden scan`: run raw HTTP messages or text files through the Engine.

The fourth adapter of DESIGN.md, for rule maintainers and investigators: the
same decisions as the live path, one JSON object a line, no network.
Files are streamed in pieces, so a large capture of a body costs memory bounded
by the Engine's limits, not by the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

READ_PIECE = 64 * 1024
"""Bytes read from a file per step: the size of a typical socket read, so the
scan exercises the same incremental path as the proxy."""

EXIT_OK = 0
EXIT_USAGE = 2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "scan",
        help="scan raw HTTP messages or text files with a rule set",
        description="Scan raw HTTP/1.1 messages (--http) or text files (--text) and print "
        "one JSON verdict per file.",
    )
    p.add_argument("--rules", type=Path, help="rule-set directory (default: the bundled sample rules)")
    p.add_argument("--backend", default="auto", choices=("auto", "hyperscan", "aho"),
                   help="keyword matcher backend (default: auto = hyperscan when installed)")
    p.add_argument("--http", nargs="+", type=Path, default=[], metavar="FILE",
                   help="files holding one raw HTTP/1.x message each (exact wire bytes)")
    p.add_argument("--text", nargs="+", type=Path, default=[], metavar="FILE",
                   help="plain text files (charset sniffed: UTF-8, else GB18030)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linewarden.cli import load_engine

    if not args.http and not args.text:
        print("linewarden scan: give --http FILE... or --text FILE...", file=sys.stderr)
        return EXIT_USAGE
    engine = load_engine(args.rules, args.backend, "linewarden scan")
    if engine is None:
        return EXIT_USAGE
    out = sys.stdout
    for path in args.http:
        out.write(json.dumps(scan_http_file(engine, path), ensure_ascii=False) + "\n")
    for path in args.text:
        out.write(json.dumps(scan_text_file(engine, path), ensure_ascii=False) + "\n")
    return EXIT_OK


def scan_http_file(engine: Any, path: Path) -> dict[str, Any]:
    """One raw message: framing via Http1Stream, then the Engine, best effort on errors."""
    from rules.wire import Http1Stream

    try:
        pieces = _read_pieces(path)
        first = next(pieces, b"")
    except OSError as exc:
        return {"file": str(path), "error": f"cannot read: {exc.strerror or exc}"}
    is_request = not first.lstrip(b"\r\n").startswith(b"HTTP/")
    stream = Http1Stream(is_request=is_request)
    scan = None
    errors: list[str] = []
    done = False
    for piece in _chain(first, pieces):
        for ev in stream.feed(piece):
            scan, done = _apply(engine, ev, scan, errors, done)
        if done or errors:
            break
    if not done and not errors:
        for ev in stream.eof():
            scan, done = _apply(engine, ev, scan, errors, done)
    if scan is None:
        return {"file": str(path), "error": "; ".join(errors) or "http: no message"}
    verdict = scan.finish()
    result = _verdict_json(str(path), verdict)
    all_errors = errors + list(verdict.errors)
    if not done and not errors:
        all_errors.append("http: message ended early")
    if all_errors:
        result["error"] = "; ".join(all_errors)
    return result


def _apply(engine: Any, ev: Any, scan: Any, errors: list[str], done: bool) -> tuple[Any, bool]:
    from rules.wire import BodyData, EndOfMessage, Head, ParseError

    if isinstance(ev, Head):
        if ev.is_request:
            scan = engine.request_scanner(ev.method or "GET", ev.target or b"/", ev.headers)
        else:
            scan = engine.response_scanner(ev.status or 0, ev.headers)
    elif isinstance(ev, BodyData) and scan is not None:
        scan.feed(ev.data)
    elif isinstance(ev, EndOfMessage):
        done = True
    elif isinstance(ev, ParseError):
        errors.append(str(ev))
    return scan, done


def scan_text_file(engine: Any, path: Path) -> dict[str, Any]:
    """A text file: one text/plain body, charset sniffed."""
    try:
        scan = engine.response_scanner(200, [(b"content-type", b"text/plain")])
        for piece in _read_pieces(path):
            scan.feed(piece)
    except OSError as exc:
        return {"file": str(path), "error": f"cannot read: {exc.strerror or exc}"}
    verdict = scan.finish()
    result = _verdict_json(str(path), verdict)
    if verdict.errors:
        result["error"] = "; ".join(verdict.errors)
    return result


def _verdict_json(name: str, verdict: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "file": name,
        "action": verdict.action,
        "matches": [
            {"id": m.rule_id, "category": m.category, "keyword": m.pattern, "where": m.where}
            for m in verdict.matches
        ],
        "ruleset_version": verdict.ruleset_version,
    }
    if verdict.truncated:
        result["truncated"] = True
    return result


def _read_pieces(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while piece := f.read(READ_PIECE):
            yield piece


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest
