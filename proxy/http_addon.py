"""The mitmproxy addon: intercepted HTTPS (and HTTP/2) gets the full HTTP treatment.

Owns: one addon class, ``LinewardenHttp``, with typed options, that asks the
Engine at each HTTP hook and builds the http records of intercepted flows:

* ``requestheaders``: head → ``engine.request_scanner`` (host, URL, target
  rules); a block answers 451 without contacting the server. A body longer than
  ``linewarden_request_hold_max`` (by Content-Length) is blocked or streamed
  with scanning (``linewarden_over_cap``).
* ``request``: the buffered body is scanned before it is sent (mitmproxy holds
  it until this hook returns): a blocked post never reaches the server.
* ``responseheaders``: text-like bodies are held (mitmproxy buffers them, up to
  ``stream_large_bodies`` = the hold window); media is streamed untouched.
* ``response``: the held body is scanned and replaced by the 451 page on a block.

The fast path (``proxy.fastpath``) carries plain HTTP and TLS passthrough and
hands intercepted TLS to this mitmproxy with a loopback ``CONNECT`` whose
``X-Linewarden-Conn`` header names the connection's uid and real client; the
addon keeps that in ``http_connect`` so its records join the fast path's conn
and tls records, and reports the upstream socket's local address (the NAT
address) back through ``nat_table``.

Must not: match or decode (the Engine does), write SQL (records go to
``submit``), or block the event loop. Limitation: a body whose length is not
known in advance and outgrows the hold window is switched to streaming by
mitmproxy itself, unscanned past that point; the record says ``truncated``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from proxy.blockpage import render
from proxy.fastpath import as_engine_ref
from proxy.fastpath_http import is_text_like
from proxy.http_records import ConnInfo, DnsNames, http_record, merge, new_uid
from rules.verdict import Verdict
from storage.records import Record

log = logging.getLogger(__name__)

CONN_HEADER = "X-Linewarden-Conn"
"""Same header the fast path sends (``proxy.fastpath.LW_CONN_HEADER``)."""
META = "linewarden"
"""``flow.metadata`` key of the per-flow state."""
DEFAULT_HOLD = 1 << 20


def now_us() -> int:
    import time

    return time.time_ns() // 1000


def parse_conn_header(value: str) -> tuple[str, str, int]:
    """``uid client_ip client_port`` → tuple; ``ValueError`` says what is wrong."""
    parts = value.split()
    if len(parts) != 3:
        raise ValueError(f"expected 'uid ip port', got {value[:80]!r}")
    uid, ip, port = parts
    if not uid.isalnum():
        raise ValueError(f"bad uid {uid[:40]!r}")
    p = int(port)
    if not 0 <= p < 65536:
        raise ValueError(f"bad port {p}")
    return uid, ip, p


@dataclass(slots=True)
class _FlowState:
    conn: ConnInfo
    ts: int
    req_scan: object
    req_verdict: Verdict
    resp_scan: object | None = None
    resp_verdict: Verdict | None = None
    blocked: bool = False
    policy: str | None = None
    streamed: list[str] = field(default_factory=list)
    status: int | None = None
    """The server's status when its response was replaced by the block page."""
    resp_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """The server's response headers (kept for the record when the page replaces them)."""


class _ScanningStream:
    """``Message.stream`` callable for a body past the hold window: scans and forwards,
    one piece behind, so that the last piece goes out only after the final verdict (a
    match found at the end must not let the whole body through). After a block it
    forwards nothing more and the flow is killed."""

    def __init__(self, scan: object, on_block: Callable[[Verdict], None]) -> None:
        self.scan = scan
        self.on_block = on_block
        self.blocked = False
        self.verdict: Verdict | None = None
        self._pending = b""

    def __call__(self, data: bytes) -> bytes:
        if self.blocked:
            return b""
        self.verdict = self.scan.feed(data) if data else self.scan.finish()  # type: ignore[attr-defined]
        if self.verdict.action == "block":
            self.blocked = True
            self._pending = b""
            self.on_block(self.verdict)
            return b""
        out, self._pending = self._pending, data
        return out


class LinewardenHttp:
    """mitmproxy addon: Engine decisions and records for HTTP flows."""

    def __init__(
        self,
        engine: object,
        submit: Callable[[Record], bool],
        *,
        identity: object | None = None,
        dns_names: DnsNames | None = None,
        nat_table: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self.engine_ref = as_engine_ref(engine)
        """An Engine or the app's ``EngineRef``: each flow uses the Engine current at its start."""
        self.submit = submit
        self.identity = identity
        self.dns_names = dns_names
        self.nat_table = nat_table if nat_table is not None else {}
        self._conns: dict[str, ConnInfo] = {}
        """mitmproxy client connection id → the fast path's connection facts."""
        self.request_hold_max = DEFAULT_HOLD
        self.response_hold_max = DEFAULT_HOLD
        self.over_cap = "stream"
        self.scan_media = False
        self.blocked_by: str | None = None
        self.fail = "open"

    @property
    def engine(self) -> object:
        return self.engine_ref.engine  # type: ignore[attr-defined]

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "linewarden_request_hold_max", int, DEFAULT_HOLD,
            "Request body bytes held and scanned before anything reaches the server.",
        )
        loader.add_option(
            "linewarden_response_hold_max", int, DEFAULT_HOLD,
            "Text-like response body bytes held back for scanning (the scan window).",
        )
        loader.add_option(
            "linewarden_over_cap", str, "stream",
            "Past a hold cap: 'stream' (forward, keep scanning, record) or 'block' (451).",
        )
        loader.add_option(
            "linewarden_scan_media", bool, False,
            "Scan image/audio/video/font bodies too (default: stream them untouched).",
        )
        loader.add_option(
            "linewarden_fail", str, "open",
            "A body that could not be fully decoded or scanned: 'open' (pass, record) or 'closed' (451).",
        )
        loader.add_option(
            "linewarden_blocked_by", str, "",
            'URI for the 451 page\'s Link: rel="blocked-by" header (RFC 7725); empty: none.',
        )

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        for name in ("linewarden_request_hold_max", "linewarden_response_hold_max"):
            if name in updated and getattr(o, name) < 0:
                raise exceptions.OptionsError(f"{name} must be >= 0, got {getattr(o, name)}")
        if "linewarden_over_cap" in updated and o.linewarden_over_cap not in ("stream", "block"):
            raise exceptions.OptionsError(
                f"linewarden_over_cap must be 'stream' or 'block', got {o.linewarden_over_cap!r}")
        if "linewarden_fail" in updated and o.linewarden_fail not in ("open", "closed"):
            raise exceptions.OptionsError(f"linewarden_fail must be 'open' or 'closed', got {o.linewarden_fail!r}")
        if "linewarden_blocked_by" in updated and any(c in o.linewarden_blocked_by for c in " <>\r\n"):
            raise exceptions.OptionsError(f"linewarden_blocked_by is not a URI: {o.linewarden_blocked_by!r}")
        self.request_hold_max = o.linewarden_request_hold_max
        self.response_hold_max = o.linewarden_response_hold_max
        self.over_cap = o.linewarden_over_cap
        self.scan_media = o.linewarden_scan_media
        self.blocked_by = o.linewarden_blocked_by or None
        self.fail = o.linewarden_fail

    # -- connection facts ---------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """The fast path's loopback CONNECT: remember whose connection this is."""
        value = flow.request.headers.get(CONN_HEADER)
        if value is None:
            return
        try:
            uid, ip, port = parse_conn_header(value)
        except ValueError as e:
            log.warning("ignoring %s header: %s", CONN_HEADER, e)
            return
        conn = ConnInfo(uid=uid, ts=now_us(), client_ip=ip, client_port=port)
        self._fill_identity(conn)
        self._conns[flow.client_conn.id] = conn

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        conn = self._conns.get(data.client.id)
        if conn is not None and data.server.sockname:
            conn.nat_ip, conn.nat_port = data.server.sockname[0], data.server.sockname[1]
            self.nat_table[conn.uid] = (conn.nat_ip, conn.nat_port)

    def client_disconnected(self, client) -> None:  # type: ignore[no-untyped-def]
        self._conns.pop(client.id, None)

    def _fill_identity(self, conn: ConnInfo) -> None:
        if self.identity is not None:
            conn.account = self.identity.account_for(conn.client_ip)  # type: ignore[attr-defined]
            conn.client_mac = self.identity.mac_for(conn.client_ip)  # type: ignore[attr-defined]

    def _conn_for(self, flow: http.HTTPFlow) -> ConnInfo:
        conn = self._conns.get(flow.client_conn.id)
        if conn is None:
            # Not from the fast path (mitmproxy used on its own): the peer is the client.
            peer = flow.client_conn.peername or ("", 0)
            conn = ConnInfo(uid=new_uid(), ts=now_us(), client_ip=peer[0], client_port=peer[1])
            self._fill_identity(conn)
            self._conns[flow.client_conn.id] = conn
        server = flow.server_conn
        if server.peername:
            conn.server_ip, conn.server_port = server.peername[0], server.peername[1]
        elif server.address and conn.server_ip is None:
            conn.server_ip, conn.server_port = server.address[0], server.address[1]
        if server.sockname:
            conn.nat_ip, conn.nat_port = server.sockname[0], server.sockname[1]
        if self.dns_names and conn.server_ip and conn.dns_name is None:
            conn.dns_name = self.dns_names(conn.client_ip, conn.server_ip)
        return conn

    # -- HTTP hooks ---------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.method == "CONNECT":
            return
        req = flow.request
        headers = list(req.headers.fields)
        if not any(k.lower() == b"host" for k, _ in headers) and req.authority:
            headers.insert(0, (b"Host", req.authority.encode("idna", "replace")))
        scan = self.engine.request_scanner(req.method, req.data.path, headers)  # type: ignore[attr-defined]
        st = _FlowState(self._conn_for(flow), now_us(), scan, scan.head_verdict)
        flow.metadata[META] = st
        if st.req_verdict.action == "block":
            self._block(flow, st)
            return
        size = _content_length(req.headers)
        if size is not None and size > self.request_hold_max:
            if self.over_cap == "block":
                st.policy = f"request body over linewarden_request_hold_max ({self.request_hold_max})"
                self._block(flow, st)
                return
            st.streamed.append("request")
            req.stream = _ScanningStream(scan, lambda v: self._late_block(flow, st, v, request=True))

    def request(self, flow: http.HTTPFlow) -> None:
        st: _FlowState | None = flow.metadata.get(META)
        if st is None or st.blocked:
            return
        if isinstance(flow.request.stream, _ScanningStream):
            stream = flow.request.stream
            if stream.verdict is not None:
                st.req_verdict = stream.verdict
            if stream.blocked:
                flow.kill()
            return
        body = flow.request.raw_content
        if body:
            st.req_verdict = st.req_scan.feed(body)  # type: ignore[attr-defined]
        st.req_verdict = self._fail_policy(st.req_scan.finish())  # type: ignore[attr-defined]
        if st.req_verdict.action == "block":
            self._block(flow, st)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st: _FlowState | None = flow.metadata.get(META)
        if st is None or st.blocked or flow.response is None:
            return
        resp = flow.response
        fields = list(resp.headers.fields)
        st.status, st.resp_headers = resp.status_code, fields
        if not (self.scan_media or is_text_like(fields)):
            resp.stream = True  # media: straight through, never buffered
            return
        st.resp_scan = self.engine.response_scanner(resp.status_code, fields)  # type: ignore[attr-defined]
        size = _content_length(resp.headers)
        if size is not None and size > self.response_hold_max:
            if self.over_cap == "block":
                st.policy = f"response body over linewarden_response_hold_max ({self.response_hold_max})"
                self._block(flow, st, drain_server=True)
                return
            st.streamed.append("response")
            resp.stream = _ScanningStream(st.resp_scan, lambda v: self._late_block(flow, st, v, request=False))

    def response(self, flow: http.HTTPFlow) -> None:
        st: _FlowState | None = flow.metadata.get(META)
        if st is None:
            return
        if st.blocked:
            self._record(flow, st)
            return
        resp = flow.response
        assert resp is not None
        if isinstance(resp.stream, _ScanningStream):
            st.resp_verdict = resp.stream.verdict
        elif st.resp_scan is not None:
            if resp.raw_content is None:
                st.streamed.append("response (unknown length past the hold window)")
            else:
                st.resp_scan.feed(resp.raw_content)  # type: ignore[attr-defined]
                st.resp_verdict = self._fail_policy(st.resp_scan.finish())  # type: ignore[attr-defined]
                if st.resp_verdict.action == "block":
                    self._block(flow, st)
                    return
        self._record(flow, st)

    def error(self, flow: http.HTTPFlow) -> None:
        st: _FlowState | None = flow.metadata.get(META)
        if st is not None and not st.blocked:
            self._record(flow, st, error=flow.error.msg if flow.error else "error")

    def _fail_policy(self, verdict: Verdict) -> Verdict:
        """``linewarden_fail = closed``: what could not be fully scanned is blocked."""
        if self.fail != "closed" or verdict.action == "block" or not (verdict.truncated or verdict.errors):
            return verdict
        why = "fail-closed: " + ("; ".join(verdict.errors) or "not fully scanned")
        return Verdict("block", verdict.matches, verdict.ruleset_version, verdict.truncated,
                       verdict.errors + (why[:200],))

    # -- endings -------------------------------------------------------------------

    def _verdict(self, st: _FlowState) -> Verdict:
        v = merge([st.req_verdict, st.resp_verdict])
        notes = tuple(f"streamed past hold window: {s}" for s in st.streamed)
        if st.policy:
            return Verdict("block", v.matches, v.ruleset_version, True, v.errors + (st.policy,))
        if notes:
            return Verdict(v.action, v.matches, v.ruleset_version, True, v.errors + notes)
        return v

    def _block(self, flow: http.HTTPFlow, st: _FlowState, *, drain_server: bool = False) -> None:
        """Answer with the 451 page; in the request hooks mitmproxy then never contacts the server."""
        st.blocked = True
        verdict = self._verdict(st)
        category = next((m.category for m in verdict.matches if m.action == "block"), None)
        page = render(category, st.conn.uid, blocked_by=self.blocked_by)
        response = http.Response.make(page.status, page.body, list(page.headers))
        if drain_server:
            # Response headers already in: swallow the server's body, send the page at its end.
            body = page.body
            response.stream = lambda data: b"" if data else body
        flow.response = response
        if flow.request.stream and not isinstance(flow.request.stream, _ScanningStream):
            flow.request.stream = False
        # The flow ends with this page: record now (the response hook may never come).
        self._record(flow, st)

    def _late_block(self, flow: http.HTTPFlow, st: _FlowState, verdict: Verdict, *, request: bool) -> None:
        """A block found in a body already partly forwarded: stop it and record; mitmproxy
        cannot send a page after the head went out, so the flow is killed."""
        st.blocked = True
        if request:
            st.req_verdict = verdict
        else:
            st.resp_verdict = verdict
        self._record(flow, st)
        flow.kill()

    def _record(self, flow: http.HTTPFlow, st: _FlowState, error: str | None = None) -> None:
        if flow.metadata.get("linewarden_recorded"):
            return
        flow.metadata["linewarden_recorded"] = True
        verdict = self._verdict(st)
        if error:
            verdict = Verdict(verdict.action, verdict.matches, verdict.ruleset_version, verdict.truncated,
                              verdict.errors + (error,))
        req = flow.request
        resp = flow.response
        if st.blocked:
            upstream_status = st.status  # None: blocked before the server answered
        else:
            upstream_status = resp.status_code if resp is not None else None
        resp_headers = st.resp_headers if st.blocked else (list(resp.headers.fields) if resp is not None else [])
        self.submit(
            http_record(
                self._conn_for(flow), st.ts, method=req.method, url=req.path, host=req.pretty_host,
                req_headers=list(req.headers.fields), status=upstream_status, resp_headers=resp_headers,
                req_bytes=len(req.raw_content or b""),
                resp_bytes=len(resp.raw_content or b"") if resp is not None and not st.blocked else 0,
                verdict=verdict, action="block" if st.blocked else None,
            )
        )


def _content_length(headers: http.Headers) -> int | None:
    value = headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)
