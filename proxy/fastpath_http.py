"""Plain HTTP/1.x on the fast path: one client connection, its transactions in order.

Owns: the proxy state machine for HTTP/1.x (keep-alive, pipelining in order,
``Expect: 100-continue``, explicit absolute-form and CONNECT, transparent
origin-form), the hold-back that lets a block still become a 451, and the
http record of each transaction.

Strategy (issue 4):
* request: the head goes to ``engine.request_scanner`` (host, URL, path and
  query rules); the body is fed to the scanner as it arrives and *held*, with
  the head, up to ``request_hold_max``: nothing reaches the server before the
  whole request is scanned, so a blocked forum post is never seen by it.
* response: text-like bodies are fed to ``engine.response_scanner`` and held
  back, head included, up to ``response_hold_max`` (the scan window), so a match
  anywhere in a normal page is answered with the block page. Media and other
  binary types are streamed as they arrive (unless ``scan_media``).
* past a cap, ``over_cap`` applies: ``block`` (451) or ``stream`` (send what was
  held, keep scanning what follows; a later block resets the connection so the
  client never takes a cut body for a whole one).
* bodies are forwarded with the sender's framing (Content-Length as sent, or
  chunked re-framed per piece) and their content coding untouched: the client
  gets the entity bytes the server sent, gzip included.

Must not: decide (the Engine does), parse bytes itself (``rules.wire``), or
write SQL (records go to ``submit``).
"""

from __future__ import annotations

import functools
import http
import ipaddress
from collections import deque
from typing import TYPE_CHECKING

from proxy.blockpage import render
from proxy.fastpath import ConnState, now_us
from proxy.http_records import ConnInfo, http_record, merge
from proxy.relay import Side, splice, spliced
from proxy.tlshello import looks_like_tls
from rules.target import host_of
from rules.verdict import Verdict
from rules.wire import BodyData, EndOfMessage, Head, Http1Stream, ParseError

if TYPE_CHECKING:
    from proxy.fastpath import FastPath

HOP_BY_HOP_DROPPED = frozenset({b"proxy-connection", b"proxy-authorization"})
"""Headers meant for the proxy itself (RFC 9110 7.6.1 and 11.7.2), never forwarded."""

TEXT_TYPES = frozenset(
    {
        "application/json", "application/xml", "application/javascript", "application/x-javascript",
        "application/ecmascript", "application/x-www-form-urlencoded", "application/xhtml+xml",
        "application/rss+xml", "application/atom+xml", "application/ld+json", "multipart/form-data",
        "multipart/mixed",
    }
)

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def is_text_like(headers: list[tuple[bytes, bytes]]) -> bool:
    """Should this body be scanned? Text, markup, scripts, forms; or no type at all
    (the decoder sniffs). Images, audio, video, fonts, archives: no."""
    ctype = _header(headers, b"content-type")
    if ctype is None:
        return True
    main = ctype.split(b";", 1)[0].strip().lower().decode("latin-1")
    if not main or main.startswith("text/") or main in TEXT_TYPES:
        return True
    return main.endswith("+json") or main.endswith("+xml")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    out: set[bytes] = set()
    for k, v in headers:
        if k.lower() == name:
            out.update(t.strip().lower() for t in v.split(b","))
    return out


def keep_alive(head: Head) -> bool:
    """RFC 9112 9.3: 1.1 persists unless ``close``; 1.0 only with ``keep-alive``."""
    conn = _tokens(head.headers, b"connection")
    if head.version == "1.0":
        return b"keep-alive" in conn
    return b"close" not in conn


def is_chunked(head: Head) -> bool:
    return b"chunked" in _tokens(head.headers, b"transfer-encoding")


def frame(data: bytes, chunked: bool) -> bytes:
    """Body piece on the wire: chunked pieces get their size line back."""
    if not chunked:
        return data
    return b"%x\r\n" % len(data) + data + b"\r\n"


def response_head_bytes(head: Head) -> bytes:
    status = head.status or 0
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/{head.version} {status} {phrase}".encode()]
    lines += [k + b": " + v for k, v in head.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Refused(Exception):
    """The request cannot be forwarded (bad destination); answered with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class HttpExchange:
    """One client connection carrying HTTP/1.x."""

    def __init__(self, fp: FastPath, state: ConnState, client: Side, dst: tuple[str, int] | None) -> None:
        self.fp = fp
        self.state = state
        self.conn: ConnInfo = state.conn
        self.client = client
        self.fixed_dst = dst
        """Transparent mode or inside a CONNECT tunnel: every request goes there."""
        self.reqp = Http1Stream(is_request=True)
        self.req_events: deque[object] = deque()
        self._req_fed = 0
        self._req_last = b""
        self.upstream: Side | None = None
        self.up_dst: tuple[str, int] | None = None
        self.respp: Http1Stream | None = None
        self.resp_events: deque[object] = deque()
        self._resp_fed = 0
        self._resp_last = b""

    # -- event pumps ------------------------------------------------------------

    async def _next_req(self, timeout: float) -> object | None:
        while not self.req_events:
            data = await self.client.read(timeout)
            if not data:
                evs = self.reqp.eof()
                if not evs:
                    return None
                self.req_events.extend(evs)
                break
            self._req_fed += len(data)
            self._req_last = data
            self.req_events.extend(self.reqp.feed(data))
        return self.req_events.popleft()

    async def _next_resp(self) -> object | None:
        assert self.upstream is not None and self.respp is not None
        while not self.resp_events:
            data = await self.upstream.read(self.fp.config.idle_timeout)
            if not data:
                evs = self.respp.eof()
                if not evs:
                    return None
                self.resp_events.extend(evs)
                break
            self._resp_fed += len(data)
            self._resp_last = data
            self.resp_events.extend(self.respp.feed(data))
        return self.resp_events.popleft()

    @staticmethod
    def _leftover(stream: Http1Stream, fed: int, last: bytes) -> bytes:
        """Bytes of the last read after the head that turned ``stream`` into a tunnel."""
        n = fed - stream.offset
        return last[len(last) - n :] if n > 0 else b""

    # -- the connection ---------------------------------------------------------

    async def run(self) -> None:
        self.state.service = "http"
        timeout = 30.0
        while True:
            ev = await self._next_req(timeout)
            timeout = self.fp.config.idle_timeout
            if ev is None:
                self.state.close_reason = self.state.close_reason or "fin"
                return
            if isinstance(ev, ParseError):
                self._bad_request(400, f"malformed request: {ev.reason} (byte {ev.offset})")
                return
            if not isinstance(ev, Head):
                self._bad_request(400, "unexpected data")
                return
            if not await self._transaction(ev):
                return

    def _bad_request(self, status: int, reason: str, head: Head | None = None) -> None:
        """Answer a request we cannot forward; record it; the connection ends."""
        phrase = http.HTTPStatus(status).phrase
        body = f"{status} {phrase}: {reason}\n".encode()
        self.client.write(
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        version = getattr(self.fp.engine, "version", 0)
        verdict = Verdict("block", ruleset_version=version, errors=(reason,))
        self.state.note(verdict)
        self.fp.submit(
            http_record(
                self.conn, now_us(), method=head.method if head else None,
                url=head.target.decode("latin-1") if head and head.target else None,
                host=host_of(head.target or b"", head.headers) if head else None,
                req_headers=head.headers if head else [], status=status, verdict=verdict,
            )
        )
        self.state.close_reason = f"error: {reason}"[:200]

    def _destination(self, head: Head) -> tuple[str, int]:
        if self.fixed_dst is not None:
            return self.fixed_dst
        target = head.target or b""
        if target.startswith(b"/") or target == b"*":
            host = _header(head.headers, b"host")
            if not host:
                raise _Refused(400, "no destination: origin-form target without Host")
            authority = host.decode("latin-1")
        else:
            scheme, sep, rest = target.partition(b"://")
            if not sep:
                raise _Refused(400, "request target is neither absolute nor origin form")
            if scheme.lower() != b"http":
                raise _Refused(501, f"scheme {scheme[:10]!r} not proxied (use CONNECT for https)")
            authority = rest.split(b"/", 1)[0].split(b"?", 1)[0].decode("latin-1")
        host, port = _split_authority(authority, 80)
        listen = self.fp.address or self.fp.config.listen
        if port == listen[1] and host in (listen[0], "127.0.0.1", "localhost", "::1"):
            raise _Refused(508, "request addressed to the proxy itself")
        return host, port

    def _request_head(self, head: Head, answered_continue: bool) -> bytes:
        """The head as forwarded: origin-form target, proxy headers dropped."""
        target = head.target or b"/"
        headers = head.headers
        if self.fixed_dst is None and not target.startswith(b"/") and target != b"*":
            rest = target.partition(b"://")[2]
            slash = rest.find(b"/")
            authority = rest[:slash] if slash >= 0 else rest.split(b"?", 1)[0]
            target = rest[slash:] if slash >= 0 else b"/" + rest[len(authority):]
            if _header(headers, b"host") is None:
                headers = [(b"Host", authority)] + headers
        lines = [b"%s %s HTTP/%s" % (head.method.encode(), target, head.version.encode())]  # type: ignore[union-attr]
        for k, v in headers:
            lk = k.lower()
            if lk in HOP_BY_HOP_DROPPED or (answered_continue and lk == b"expect"):
                continue
            lines.append(k + b": " + v)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _upstream_for(self, dst: tuple[str, int]) -> Side | None:
        if self.upstream is not None and self.up_dst == dst and not self.upstream.eof:
            return self.upstream
        self._drop_upstream()
        up = await self.fp.connect(self.state, dst[0], dst[1])
        if up is None:
            return None
        self.upstream, self.up_dst = up, dst
        self.respp = Http1Stream(is_request=False)
        self.resp_events.clear()
        self._resp_fed = 0
        return up

    def _drop_upstream(self, abort: bool = False) -> None:
        if self.upstream is not None:
            self.state.bytes_down += self.upstream.bytes_in
            self.upstream.abort() if abort else self.upstream.close()
            self.upstream = None
            self.state.upstream = None
            self.up_dst = None

    # -- one transaction --------------------------------------------------------

    async def _transaction(self, head: Head) -> bool:
        """Forward one request and its response; True when the connection goes on."""
        fp, cfg = self.fp, self.fp.config
        if head.method == "CONNECT":
            if self.fixed_dst is not None:
                self._bad_request(405, "CONNECT inside a redirected or tunnelled connection", head)
                return False
            await self._connect(head)
            return False
        try:
            dst = self._destination(head)
        except _Refused as exc:
            self._drain_quietly()
            self._bad_request(exc.status, exc.reason, head)
            return False
        engine = fp.engine
        ts = now_us()
        fp.stats.http_requests += 1
        target = head.target or b""
        scan = engine.request_scanner(head.method, target, head.headers)  # type: ignore[attr-defined]
        tx = _Tx(head, ts, host_of(target, head.headers), scan.head_verdict)
        if self.upstream is None and self.fixed_dst is None:
            # Known before any connect: a request blocked here still names its server.
            self.conn.server_port = dst[1]
            if _is_ip(dst[0]):
                self.conn.server_ip = dst[0]
        req_keep = keep_alive(head)
        if tx.req_verdict.action == "block":
            drained = await self._discard_request_body(cfg.request_hold_max)
            return self._block(tx, keep=req_keep and drained)

        chunked = is_chunked(head)
        wants_continue = b"100-continue" in _tokens(head.headers, b"expect")
        held: list[bytes] = []
        held_n = 0
        lag = b""
        upstream: Side | None = None
        answered_continue = False
        while True:
            if wants_continue and not answered_continue and not self.req_events:
                # We read the body ourselves before the server sees anything (RFC 9110 10.1.1).
                self.client.write(CONTINUE_100)
                answered_continue = True
            ev = await self._next_req(cfg.idle_timeout)
            if isinstance(ev, BodyData):
                tx.req_bytes += len(ev.data)
                tx.req_verdict = scan.feed(ev.data)
                if tx.req_verdict.action == "block":
                    if upstream is not None:
                        self._drop_upstream(abort=True)  # the server must not take a cut body as whole
                    drained = await self._discard_request_body(cfg.request_hold_max)
                    return self._block(tx, keep=req_keep and drained)
                piece = frame(ev.data, chunked)
                if upstream is not None:
                    # Past the cap: streamed one piece behind, so that the piece that
                    # completes the request leaves only after the final verdict.
                    upstream.write(lag)
                    lag = piece
                    await upstream.drain()
                    continue
                held.append(piece)
                held_n += len(ev.data)
                if held_n > cfg.request_hold_max:
                    if cfg.over_cap == "block":
                        tx.policy = f"request body over request_hold_max ({cfg.request_hold_max})"
                        drained = await self._discard_request_body(cfg.request_hold_max)
                        return self._block(tx, keep=req_keep and drained)
                    tx.over_cap = True
                    upstream = await self._upstream_for(dst)
                    if upstream is None:
                        return self._gateway_error(tx, 502, "cannot reach the server")
                    lag = held.pop()
                    upstream.write(self._request_head(head, answered_continue) + b"".join(held))
                    held.clear()
                    await upstream.drain()
            elif isinstance(ev, EndOfMessage):
                if tx.req_bytes:
                    tx.req_verdict = self._fail_policy(scan.finish())
                # else: no body, nothing for the decoder to flush: the head verdict is final.
                if tx.req_verdict.action == "block":
                    if upstream is not None:
                        self._drop_upstream(abort=True)
                    return self._block(tx, keep=req_keep)
                tail = b"0\r\n\r\n" if chunked else b""
                if upstream is None:
                    upstream = await self._upstream_for(dst)
                    if upstream is None:
                        return self._gateway_error(tx, 502, "cannot reach the server")
                    upstream.write(self._request_head(head, answered_continue) + b"".join(held) + tail)
                else:
                    upstream.write(lag + tail)
                break
            elif isinstance(ev, ParseError):
                self._drop_upstream(abort=True)
                self._bad_request(400, f"malformed request body: {ev.reason} (byte {ev.offset})", head)
                return False
            else:
                self._drop_upstream(abort=True)
                self.state.close_reason = "error: client closed inside a request"
                return False
        assert self.respp is not None
        self.respp.expect_method(head.method or "GET")
        return await self._response(tx, req_keep)

    async def _response(self, tx: _Tx, req_keep: bool) -> bool:
        fp, cfg = self.fp, self.fp.config
        client = self.client
        while True:
            ev = await self._next_resp()
            if isinstance(ev, Head):
                if ev.status is not None and 100 <= ev.status < 200 and ev.status != 101:
                    if ev.status != 100 or b"100-continue" in _tokens(tx.head.headers, b"expect"):
                        client.write(response_head_bytes(ev))
                    continue
                break
            reason = ev.reason if isinstance(ev, ParseError) else "server closed without a response"
            return self._gateway_error(tx, 502, reason)
        rhead = ev
        tx.status, tx.resp_headers = rhead.status, rhead.headers
        if rhead.status == 101:
            return await self._upgrade(tx, rhead)
        scanning = cfg.scan_media or is_text_like(rhead.headers)
        rscan = fp.engine.response_scanner(rhead.status or 0, rhead.headers) if scanning else None  # type: ignore[attr-defined]
        holding = scanning
        chunked = is_chunked(rhead)
        close_delimited = not chunked and _header(rhead.headers, b"content-length") is None
        head_bytes = response_head_bytes(rhead)
        held: list[bytes] = [head_bytes]
        held_n = 0
        lag = b""
        if not holding:
            client.write(head_bytes)
        while True:
            ev = await self._next_resp()
            if isinstance(ev, BodyData):
                data = ev.data
                tx.resp_bytes += len(data)
                piece = frame(data, chunked)
                if rscan is not None:
                    tx.resp_verdict = rscan.feed(data)
                    if tx.resp_verdict.action == "block":
                        return self._response_blocked(tx, holding, req_keep)
                if holding:
                    held.append(piece)
                    held_n += len(data)
                    if held_n > cfg.response_hold_max:
                        if cfg.over_cap == "block":
                            tx.policy = f"response body over response_hold_max ({cfg.response_hold_max})"
                            return self._response_blocked(tx, True, req_keep)
                        tx.over_cap = True
                        holding = False
                        # Past the window: stream, but one piece behind, so the last piece
                        # leaves only after the final verdict (a match at the very end must
                        # still cut the body).
                        lag = held.pop()
                        client.write(b"".join(held))
                        held.clear()
                        await client.drain()
                elif rscan is not None:
                    client.write(lag)
                    lag = piece
                    await client.drain()
                else:
                    client.write(piece)
                    await client.drain()
            elif isinstance(ev, EndOfMessage):
                if rscan is not None:
                    tx.resp_verdict = self._fail_policy(rscan.finish())
                    if tx.resp_verdict.action == "block":
                        return self._response_blocked(tx, holding, req_keep)
                tail = b"0\r\n\r\n" if chunked else b""
                if holding:
                    client.write(b"".join(held) + tail)
                elif lag or tail:
                    client.write(lag + tail)
                break
            else:
                reason = ev.reason if isinstance(ev, ParseError) else "server closed inside the response"
                if holding:
                    return self._gateway_error(tx, 502, reason)
                client.abort()
                self._drop_upstream(abort=True)
                self._record(tx, close=f"error: {reason}")
                return False
        resp_keep = keep_alive(rhead) and not close_delimited
        if not resp_keep:
            self._drop_upstream()
        self._record(tx)
        if close_delimited:
            self.state.close_reason = "fin"
            return False
        return req_keep

    def _fail_policy(self, verdict: Verdict) -> Verdict:
        """``fail = "closed"``: a body that could not be fully decoded or scanned (a
        gzip bomb past the decode cap, a corrupt coding) is blocked, not waved through."""
        if self.fp.config.fail != "closed" or verdict.action == "block":
            return verdict
        if not (verdict.truncated or verdict.errors):
            return verdict
        why = "fail-closed: " + ("; ".join(verdict.errors) or "not fully scanned")
        return Verdict("block", verdict.matches, verdict.ruleset_version, verdict.truncated,
                       verdict.errors + (why[:200],))

    # -- endings -------------------------------------------------------------------

    def _verdict(self, tx: _Tx) -> Verdict:
        v = merge([tx.req_verdict, tx.resp_verdict])
        if tx.over_cap and not v.truncated:
            v = Verdict(v.action, v.matches, v.ruleset_version, True, v.errors + ("over hold cap: streamed",))
        return v

    def _record(self, tx: _Tx, close: str | None = None, action: str | None = None) -> None:
        verdict = self._verdict(tx)
        if tx.policy:
            verdict = Verdict("block", verdict.matches, verdict.ruleset_version, True, verdict.errors + (tx.policy,))
        self.state.note(verdict if action is None else Verdict(action, verdict.matches, verdict.ruleset_version))  # type: ignore[arg-type]
        self.fp.submit(
            http_record(
                self.conn, tx.ts, method=tx.head.method,
                url=(tx.head.target or b"").decode("latin-1"), host=tx.host,
                req_headers=tx.head.headers, status=tx.status, resp_headers=tx.resp_headers,
                req_bytes=tx.req_bytes, resp_bytes=tx.resp_bytes, verdict=verdict, action=action,
            )
        )
        if close:
            self.state.close_reason = close[:200]

    def _block(self, tx: _Tx, *, keep: bool) -> bool:
        """The request never reaches the server: answer 451 and record."""
        self._record(tx, action="block")
        self._send_block_page(tx, keep)
        if not keep:
            self.state.close_reason = "blocked"
        return keep

    def _send_block_page(self, tx: _Tx, keep: bool) -> None:
        verdict = self._verdict(tx)
        category = next((m.category for m in verdict.matches if m.action == "block"), None)
        page = render(category, self.conn.uid, blocked_by=self.fp.config.blocked_by)
        self.client.write(page.wire(keep_alive=keep))

    def _response_blocked(self, tx: _Tx, holding: bool, req_keep: bool) -> bool:
        """A response matched: the block page if nothing was sent yet, else a reset."""
        self._drop_upstream(abort=True)  # the rest of the body is not wanted
        self._record(tx, action="block")
        if holding:
            self._send_block_page(tx, req_keep)
            if not req_keep:
                self.state.close_reason = "blocked"
            return req_keep
        self.client.abort()
        self.state.close_reason = "blocked"
        return False

    def _gateway_error(self, tx: _Tx, status: int, reason: str) -> bool:
        self._drop_upstream(abort=True)
        phrase = http.HTTPStatus(status).phrase
        body = f"{status} {phrase}: {reason}\n".encode()
        self.client.write(
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        tx.status = status
        tx.resp_verdict = Verdict("allow", ruleset_version=getattr(self.fp.engine, "version", 0), errors=(reason,))
        self._record(tx, close=f"error: {reason}")
        return False

    async def _discard_request_body(self, limit: int) -> bool:
        """Read and drop the rest of a blocked request; False if it is too long to wait for."""
        seen = 0
        while True:
            try:
                ev = await self._next_req(5.0)
            except TimeoutError:
                return False
            if isinstance(ev, EndOfMessage):
                return True
            if isinstance(ev, BodyData):
                seen += len(ev.data)
                if seen > limit:
                    return False
                continue
            return False

    def _drain_quietly(self) -> None:
        self.req_events.clear()

    async def _connect(self, head: Head) -> None:
        """Explicit-mode CONNECT: answer 200, then treat the tunnel like a redirected connection."""
        try:
            host, port = _split_authority((head.target or b"").decode("latin-1"), 443)
        except _Refused as exc:
            self._bad_request(exc.status, exc.reason, head)
            return
        self.client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if _is_ip(host):
            self.conn.server_ip = host
        leftover = self._leftover(self.reqp, self._req_fed, self._req_last)
        if leftover:
            self.client.buf[:0] = leftover
        self.conn.server_port = port
        await self.client.wait_data()
        if not self.client.buf:
            self.state.close_reason = "fin"
            return
        if looks_like_tls(bytes(self.client.buf[:3])):
            await self.fp.tls(self.state, self.client, host, port)
        elif _looks_like_http(bytes(self.client.buf[:8])):
            await HttpExchange(self.fp, self.state, self.client, (host, port)).run()
        else:
            self.state.service = None
            await self.fp.splice_raw(self.state, self.client, host, port)

    async def _upgrade(self, tx: _Tx, rhead: Head) -> bool:
        """101 Switching Protocols (WebSocket): forward the head, then splice both ways."""
        assert self.upstream is not None and self.respp is not None
        self.client.write(response_head_bytes(rhead))
        rest = self._leftover(self.respp, self._resp_fed, self._resp_last)
        if rest:
            self.client.write(rest)
        self._record(tx)
        upstream = self.upstream
        splice(self.client, upstream, self.fp.config.relay)
        await spliced(self.client, upstream)
        self.state.close_reason = "fin"
        return False


class _Tx:
    """One transaction's accumulating facts."""

    __slots__ = ("head", "ts", "host", "req_verdict", "resp_verdict", "req_bytes", "resp_bytes",
                 "status", "resp_headers", "over_cap", "policy")

    def __init__(self, head: Head, ts: int, host: str | None, verdict: Verdict) -> None:
        self.head = head
        self.ts = ts
        self.host = host
        self.req_verdict = verdict
        self.resp_verdict: Verdict | None = None
        self.req_bytes = 0
        self.resp_bytes = 0
        self.status: int | None = None
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.over_cap = False
        self.policy: str | None = None


_METHOD_PREFIXES = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"TRACE ")


def _looks_like_http(data: bytes) -> bool:
    return any(data.startswith(p[: len(data)]) for p in _METHOD_PREFIXES) if data else False


@functools.lru_cache(maxsize=1024)
def _is_ip(host: str) -> bool:
    """An address literal (IPv4 or IPv6)? Cached: asked for every CONNECT and request
    target, and a gateway sees the same few thousand hosts again and again, while
    ``ipaddress`` parses in Python (a few µs an address)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` → (host, port); ``_Refused`` when malformed."""
    a = authority.strip()
    if a.startswith("["):
        host, sep, rest = a[1:].partition("]")
        if not sep:
            raise _Refused(400, "bad IPv6 authority")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = a.rpartition(":") if a.count(":") == 1 else (a, "", "")
    if not host or any(c in host for c in " /\\@\r\n\t"):
        raise _Refused(400, f"bad host in {authority[:60]!r}")
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise _Refused(400, f"bad port in {authority[:60]!r}") from None
    if not 0 < port < 65536:
        raise _Refused(400, f"bad port {port}")
    return host.lower().rstrip("."), port
