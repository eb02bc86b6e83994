"""The fast path: linewarden's own listener in front of mitmproxy (issue 4).

Owns: accepting every proxied TCP connection (explicit proxy or nftables
redirect), finding its destination (absolute-form / CONNECT target, or
``SO_ORIGINAL_DST`` in transparent mode), reading its first bytes and sending
it down one of three ways:

* TLS ClientHello: the SNI goes to ``engine.tls``. Blocked: a fatal TLS alert
  (``access_denied``) and the socket closes. In interception scope: handed to
  the in-process mitmproxy listener on loopback with a ``CONNECT`` naming the
  original destination (the addon then does the full HTTP treatment). Else:
  spliced to the server at socket level (``proxy.relay``), bytes counted.
* plain HTTP/1.x: ``proxy.fastpath_http`` (httptools framing, incremental
  Engine scanning, hold-back, 451 block page).
* anything else inside a CONNECT tunnel: spliced, recorded as service None.

mitmproxy costs ~3.5 ms of CPU per HTTP request; this path costs a small
fraction of that, and mitmproxy is kept for what only it does well (TLS
interception with generated certificates, HTTP/2).

A new connection is driven by its protocol's callbacks (``_AcceptedSide``)
through the commonest case, TLS passed through (a ``CONNECT`` or a redirected
connection, the ClientHello, the decision, the connect, a short relay) with no
task and no timer of its own; any other turn continues in a task running the
same code as before (``_serve``).

With the C passthrough built (``proxy.passthrough``, ``FastPathConfig.native``),
C accepts instead and carries the connections this path has decided before to
the byte (a remembered ``CONNECT`` head and server name: ``_connect_head`` and
``_decide`` tell it); it hands every other connection here with what it read
(``Resume``), and reports what it carried so that ``tls_record`` and ``finish``
write the same records for it.

Must not: decide (the Engine does), parse TLS (``proxy.tlshello``) or HTTP
(``rules.wire``), or write SQL (records go to ``submit``). Errors: one
``except`` per connection (``_serve`` for a task, ``_AcceptedSide._guarded``
for the callbacks) turns anything unexpected into a closed
connection and a conn record with ``close_reason="error: ..."``; the listener
keeps serving everyone else (STYLE.md 5).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.http_records import ConnInfo, DnsNames, conn_record, new_uid, tls_record
from proxy.original_dst import original_dst
from proxy.relay import RelayMode, Side, splice, spliced
from proxy.tlshello import MAX_CLIENT_HELLO_BYTES, ClientHello, NeedMoreData, looks_like_tls, parse_client_hello
from rules.errors import InputError
from rules.wire import Head, Http1Stream
from rules.verdict import ACTIONS, Verdict
from storage.records import Record

log = logging.getLogger(__name__)

Submit = Callable[[Record], bool]

TLS_ALERT_ACCESS_DENIED = bytes([21, 3, 3, 0, 2, 2, 49])
"""A fatal ``access_denied`` alert record (RFC 8446 6.2: "a valid certificate or
PSK was received, but when access control was applied, the sender decided not
to proceed"). Sent in the clear before any handshake: every client stops there."""

SNI_MEMO_MAX = 4096
"""Server names whose verdict a fast path remembers (cleared when full): a name's
verdict is ~4 µs of Engine work, a lookup a tenth of that."""

FIRST_BYTES_TIMEOUT = 30.0
"""Seconds a new connection may stay silent before it is closed (a client that
connects and waits holds a socket; browsers send at once)."""

WAIT_SWEEP_S = 1.0
"""How often the waits of callback-driven connections (their first bytes, their
upstream connect) are checked against their limits: one timer for all of them, not
two a connection (arming and cancelling a loop timer is ~3 µs each, on every new
connection). A wait may so last up to this much longer than its limit."""


@dataclass(frozen=True, slots=True)
class FastPathConfig:
    """Settings of the fast path (the ``[http]`` config table feeds them)."""

    listen: tuple[str, int] = ("127.0.0.1", 8080)
    mode: Literal["explicit", "transparent"] = "explicit"
    request_hold_max: int = 1 << 20
    """Request body bytes held (and scanned) before anything reaches the server.
    A forum post or comment is far smaller; uploads beyond go by ``over_cap``."""
    response_hold_max: int = 1 << 20
    """The scan window: text-like response bytes held back so that a match can
    still be answered with the block page. 1 MiB covers nearly every HTML page."""
    over_cap: Literal["stream", "block"] = "stream"
    """Past a hold cap: ``stream`` (send what was held, keep scanning, cut the
    connection on a later block, record) or ``block`` (451)."""
    scan_media: bool = False
    """Scan image/audio/video/font/archive bodies too (the Engine yields no text
    for binary types, so this only costs time); default: stream them untouched."""
    intercept: tuple[str, ...] = ()
    """Domains whose HTTPS is handed to mitmproxy for full inspection (suffix
    match; ``*`` = all). Needs the CA (``linewarden ca init``)."""
    passthrough: tuple[str, ...] = ()
    """Domains never intercepted (pinned apps), even when ``intercept`` covers them."""
    blocked_by: str | None = None
    """URI of the blocking entity for the 451 ``Link: rel="blocked-by"`` header."""
    idle_timeout: float = 300.0
    """Seconds a keep-alive connection may wait for its next request."""
    connect_timeout: float = 10.0
    fail: Literal["open", "closed"] = "open"
    """When an internal error hits a decision: ``open`` lets the flow pass and
    records the error, ``closed`` blocks it."""
    relay: RelayMode = "auto"
    """How a passed-through connection is relayed (``proxy.relay.RelayMode``)."""
    native: bool = True
    """Put the C passthrough (``proxy.passthrough``) on the listener when it is built."""
    reuse_port: bool = False
    """Bind with SO_REUSEPORT so that several worker processes share the port
    (the kernel spreads connections over them by 4-tuple hash)."""


def native_passthrough_available() -> bool:
    """The C passthrough (``proxy._passthrough``) is built, and not turned off with
    ``LINEWARDEN_PURE_PYTHON=1`` (comparisons, and the tests of the Python path)."""
    if importlib.util.find_spec("proxy._passthrough") is None:
        return False
    return os.environ.get("LINEWARDEN_PURE_PYTHON", "") in ("", "0")


def domain_in(host: str | None, patterns: tuple[str, ...]) -> bool:
    """``host`` equals or is a subdomain of a pattern; ``*`` matches every name."""
    if not host or not patterns:
        return False
    h = host.lower().rstrip(".")
    for p in patterns:
        p = p.lower().rstrip(".").lstrip("*.") if p != "*" else p
        if p == "*" or h == p or h.endswith("." + p):
            return True
    return False


@dataclass(slots=True)
class Stats:
    """Counters for the benchmark and the status page."""

    connections: int = 0
    active: int = 0
    http_requests: int = 0
    tls_passthrough: int = 0
    tls_intercepted: int = 0
    tls_blocked: int = 0
    errors: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def now_us() -> int:
    return time.time_ns() // 1000


class _FixedEngine:
    __slots__ = ("engine",)

    def __init__(self, engine: object) -> None:
        self.engine = engine


def as_engine_ref(engine: object) -> object:
    """An Engine, or anything holding the current one in ``.engine`` (the app's
    ``EngineRef``, swapped on reload), as an object with ``.engine``."""
    return engine if hasattr(engine, "engine") else _FixedEngine(engine)


class FastPath:
    """The listener. ``engine`` is an Engine or an ``EngineRef`` (reloadable)."""

    def __init__(
        self,
        engine: object,
        submit: Submit,
        config: FastPathConfig = FastPathConfig(),
        *,
        identity: object | None = None,
        dns_names: DnsNames | None = None,
        mitm_address: tuple[str, int] | None = None,
        nat_table: dict[str, tuple[str, int]] | None = None,
        native: bool | None = None,
    ) -> None:
        self.engine_ref = as_engine_ref(engine)
        """Read once per transaction: a rule reload swaps ``engine_ref.engine`` and
        new transactions use the new Engine, running ones finish with theirs."""
        self.submit = submit
        self.config = config
        self.identity = identity
        self.dns_names = dns_names
        self.mitm_address = mitm_address
        """Loopback address of the embedded mitmproxy (regular mode), for interception."""
        self.nat_table = nat_table if nat_table is not None else {}
        """uid → upstream socket's local address, filled by the addon for intercepted flows."""
        self.stats = Stats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sni_memo: dict[str | None, Verdict] = {}
        self._sni_engine: object | None = None
        """The Engine whose verdicts ``_sni_memo`` holds."""
        self._lean: set[_AcceptedSide] = set()
        """Connections driven by callbacks (not yet, or never, handed to a task)."""
        self._lean_gone: asyncio.Future[None] | None = None
        """Set by ``stop`` while it waits for the callback-driven connections to end."""
        self._waits: dict[_AcceptedSide, float] = {}
        """Callback-driven connections waiting (first bytes, a connect) → their deadline
        (loop time), checked by ``_sweep`` every ``WAIT_SWEEP_S``."""
        self._sweeper: asyncio.TimerHandle | None = None
        self.address: tuple[str, int] | None = None
        watch = getattr(self.engine_ref, "watch", None)
        if watch is not None:
            watch(self._engine_swapped)
        self.native_enabled = (config.native and native_passthrough_available()) if native is None else native
        """Whether ``start`` puts the C passthrough (``proxy.passthrough``) on the listener."""
        self.native: Any = None
        """The ``NativePassthrough`` while it runs: it accepts, and carries the TLS
        connections whose CONNECT head and server name this path already decided."""

    @property
    def engine(self) -> object:
        return self.engine_ref.engine  # type: ignore[attr-defined]

    def _engine_swapped(self) -> None:
        """A reload: the C passthrough must not apply the old Engine's verdicts again."""
        if self.native is not None:
            self.native.forget()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.config.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        self.address = sock.getsockname()[:2]
        if self.native_enabled:
            from proxy.passthrough import NativePassthrough

            self.native = NativePassthrough(self, sock)
            self.native.start()
        else:
            self._server = await loop.create_server(self._accepted, sock=sock, backlog=1024)
        log.info("fast path listening on %s:%d (%s mode)", *self.address, self.config.mode)

    async def stop(self) -> None:
        if self.native is not None:
            self.native.stop()  # its connections end ("shutdown"), their records written; it accepts no more
        if self._server is not None:
            self._server.close()
        for c in list(self._lean):
            c.shutdown()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lean:
            # Their sockets are closing: each records itself once both ends are closed.
            self._lean_gone = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._lean_gone
            except TimeoutError:
                log.warning("%d connections did not close within %s s", len(self._lean), STOP_TIMEOUT)
            self._lean_gone = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            # Python 3.12's wait_closed also waits for accepted connections: closed above.
            await self._server.wait_closed()
            self._server = None

    def _accepted(self) -> Side:
        return _AcceptedSide(self)

    def _lean_left(self, client: _AcceptedSide) -> None:
        """``client`` is no longer driven by callbacks (ended, or handed to a task)."""
        self._lean.discard(client)
        self._waits.pop(client, None)
        gone = self._lean_gone
        if gone is not None and not self._lean and not gone.done():
            gone.set_result(None)

    def _wait(self, client: _AcceptedSide, limit: float) -> None:
        """``client`` waits for at most ``limit`` seconds from now (``_sweep`` ends it then)."""
        loop = asyncio.get_running_loop()
        self._waits[client] = loop.time() + limit
        if self._sweeper is None:
            self._sweeper = loop.call_later(WAIT_SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        """End the waits past their deadline; check again while any is left."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        over = [c for c, deadline in self._waits.items() if deadline <= now]
        for client in over:
            del self._waits[client]
        self._sweeper = loop.call_later(WAIT_SWEEP_S, self._sweep) if self._waits else None
        for client in over:
            client.expired()

    # -- one connection ---------------------------------------------------------

    def _continue(self, client: _AcceptedSide, state: ConnState, work: Coroutine[Any, Any, None]) -> None:
        """Go on with a connection in a task (everything the callbacks do not carry)."""
        task = asyncio.get_running_loop().create_task(self._serve(client, state, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _conn_info(self, client: Side) -> ConnInfo:
        assert client.transport is not None
        peer = client.transport.get_extra_info("peername") or ("", 0)
        return self.conn_info(_plain_ip(peer[0]), peer[1], now_us())

    def conn_info(self, ip: str, port: int, ts: int) -> ConnInfo:
        """A new connection's ConnInfo: its uid, and the account bound to the client address."""
        info = ConnInfo(uid=new_uid(), ts=ts, client_ip=ip, client_port=port)
        if self.identity is not None:
            info.account = self.identity.account_for(ip)  # type: ignore[attr-defined]
            info.client_mac = self.identity.mac_for(ip)  # type: ignore[attr-defined]
        return info

    async def _serve(self, client: Side, state: ConnState, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` for the connection: the one ``except`` of the task path (STYLE.md 5)."""
        try:
            await work
        except TimeoutError:
            state.close_reason = state.close_reason or "timeout"
        except asyncio.CancelledError:
            state.close_reason = state.close_reason or "shutdown"
            raise
        except Exception as exc:  # the one edge: anything unexpected ends this connection only
            self._failed(state, exc)
        finally:
            self._closed(state, client)

    def _failed(self, state: ConnState, exc: Exception) -> None:
        self.stats.errors += 1
        log.error("connection %s failed", state.conn.uid, exc_info=exc)
        state.close_reason = f"error: {type(exc).__name__}: {exc}"[:200]

    def _closed(self, state: ConnState, client: Side) -> None:
        """The connection is over: close both sockets, write its conn record."""
        self.stats.active -= 1
        client.close()
        upstream = state.upstream
        if upstream is not None:
            upstream.close()
            # The transports' relay joined the two sides both ways (``peer``): the one
            # reference cycle of a connection. Cut, its objects go as soon as the last
            # callback lets go of them, not in a cyclic collection (~17 objects a TLS
            # connection, ~3 % of a worker's CPU in gen-0/1 collections). Both are
            # closing: nothing is relayed from here on.
            upstream.peer = None
        client.peer = None
        self.finish(state, client.bytes_in, upstream.bytes_in if upstream is not None else state.bytes_down)

    def _original_dst(self, client: Side) -> tuple[str, int] | None:
        assert client.transport is not None
        sock = client.transport.get_extra_info("socket")
        try:
            ip, port = original_dst(sock)
        except OSError:
            return None
        own = client.transport.get_extra_info("sockname")
        if own and _plain_ip(own[0]) == ip and own[1] == port:
            return None  # connected to us directly: proxying it would loop
        return ip, port

    def finish(self, state: ConnState, bytes_up: int, bytes_down: int, end: int | None = None) -> None:
        """Write the connection's conn record (``bytes_up``: received from the client;
        ``end``: when it closed, µs UTC, default now)."""
        conn = state.conn
        if state.intercepted and conn.uid in self.nat_table:
            conn.nat_ip, conn.nat_port = self.nat_table.pop(conn.uid)
        if conn.dns_name is None and self.dns_names and conn.server_ip:
            conn.dns_name = self.dns_names(conn.client_ip, conn.server_ip)
        reason = state.close_reason or "fin"
        kind = reason.split(":", 1)[0] if ":" in reason else reason
        self.stats.by_reason[kind] = self.stats.by_reason.get(kind, 0) + 1
        self.submit(
            conn_record(
                conn,
                now_us() if end is None else end,
                service=state.service,
                bytes_up=bytes_up,
                bytes_down=bytes_down,
                close_reason=reason,
                action=state.action,
                rule_ids=state.rule_ids,
                ruleset_version=state.ruleset_version,
            )
        )

    # -- TLS ----------------------------------------------------------------------

    async def tls(self, state: ConnState, client: Side, host: str, port: int) -> None:
        """Decide on the ClientHello, then block, intercept or splice (the task path; a
        new connection's TLS goes through ``_AcceptedSide``'s callbacks instead)."""
        state.service = "tls"
        decision = self.tls_decision(state, await _read_hello(client))
        if decision.verdict.action == "block":
            self.tls_block(state, client, decision)
            return
        if decision.intercept:
            await self.tls_intercept(state, client, host, port, decision)
            return
        self.stats.tls_passthrough += 1
        upstream = await self.connect(state, host, port)
        self.tls_record(state, decision)  # after connecting: the record carries the server and NAT addresses
        if upstream is None:
            return
        splice(client, upstream, self.config.relay)
        await spliced(client, upstream)
        state.close_reason = state.close_reason or ("rst" if client.reset or upstream.reset else "fin")

    def tls_decision(self, state: ConnState, hello: ClientHello | None) -> TlsDecision:
        """Ask the Engine about the SNI (``hello`` None: not a parsable ClientHello)."""
        engine = self.engine
        if hello is None:
            # Not TLS after all (or a broken hello): nothing to decide on by name.
            verdict = Verdict("block" if self.config.fail == "closed" else "allow",
                              ruleset_version=engine.version, errors=("tls: unparsable ClientHello",))  # type: ignore[attr-defined]
            decision = TlsDecision(verdict, None, [], [])
        else:
            verdict = self._sni_verdict(engine, hello.sni)
            decision = TlsDecision(verdict, hello.sni, hello.alpn, hello.versions)
        state.note(verdict)
        conn = state.conn
        if self.dns_names and conn.server_ip:
            conn.dns_name = self.dns_names(conn.client_ip, conn.server_ip)
        decision.intercept = (
            verdict.action != "block"
            and self.mitm_address is not None
            and domain_in(decision.sni, self.config.intercept)
            and not domain_in(decision.sni, self.config.passthrough)
        )
        decision.ts = now_us()
        return decision

    def _sni_verdict(self, engine: object, sni: str | None) -> Verdict:
        """``engine.tls(sni)``, remembered per Engine (a reload brings a new one): the
        Engine is a pure function of the name, and a gateway's clients ask for the
        same few thousand names again and again (``SNI_MEMO_MAX``)."""
        memo = self._sni_memo
        if engine is not self._sni_engine:
            memo.clear()
            self._sni_engine = engine
            if self.native is not None:
                self.native.forget()
        verdict = memo.get(sni)
        if verdict is None:
            verdict = engine.tls(sni)  # type: ignore[attr-defined]
            if len(memo) >= SNI_MEMO_MAX:
                memo.clear()
            memo[sni] = verdict
        return verdict

    def tls_record(self, state: ConnState, d: TlsDecision) -> None:
        self.submit(tls_record(state.conn, d.ts, sni=d.sni, alpn=d.alpn, versions=d.versions,
                               verdict=d.verdict, intercepted=d.intercept))

    def tls_block(self, state: ConnState, client: Side, decision: TlsDecision) -> None:
        """A blocked name: the fatal alert, and the connection ends."""
        self.stats.tls_blocked += 1
        self.tls_record(state, decision)
        client.write(TLS_ALERT_ACCESS_DENIED)
        state.close_reason = "blocked"

    async def tls_intercept(self, state: ConnState, client: Side, host: str, port: int,
                            decision: TlsDecision) -> None:
        """Hand the connection to the embedded mitmproxy."""
        conn = state.conn
        self.stats.tls_intercepted += 1
        state.intercepted = True
        upstream = await self._mitm_tunnel(state, host, port)
        if upstream is None:
            self.tls_record(state, decision)
            return
        splice(client, upstream, self.config.relay)
        try:
            await spliced(client, upstream)
        finally:
            # mitmproxy's upstream socket (reported by the addon) is the NAT
            # address; it may reconnect during the handshake, so take the last.
            if conn.uid in self.nat_table:
                conn.nat_ip, conn.nat_port = self.nat_table[conn.uid]
            self.tls_record(state, decision)
        state.close_reason = state.close_reason or ("rst" if client.reset or upstream.reset else "fin")

    def connect_failed(self, state: ConnState, host: str, port: int, exc: BaseException) -> None:
        """A socket error reads ``[Errno N] strerror``, whichever loop (or the C passthrough)
        met it: asyncio's own words ("Connect call failed (...)") would make a record
        depend on the event loop."""
        errno = exc.errno if isinstance(exc, OSError) else None
        text = f"[Errno {errno}] {os.strerror(errno)}" if errno else str(exc)
        state.close_reason = f"error: connect {host}:{port}: {text}"[:200]

    def connected(self, state: ConnState, transport: asyncio.BaseTransport, side: Side) -> None:
        """Note the upstream socket's addresses: the server's, and the NAT (egress) address."""
        conn = state.conn
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if peer:
            conn.server_ip, conn.server_port = _plain_ip(peer[0]), peer[1]
        if local:
            conn.nat_ip, conn.nat_port = _plain_ip(local[0]), local[1]
        state.upstream = side

    async def connect(self, state: ConnState, host: str, port: int) -> Side | None:
        """Open the upstream socket; fills server and NAT addresses. None on failure."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                transport, side = await loop.create_connection(Side, host, port)
        except (OSError, TimeoutError) as exc:
            self.connect_failed(state, host, port, exc)
            return None
        self.connected(state, transport, side)
        return side

    async def _mitm_tunnel(self, state: ConnState, host: str, port: int) -> Side | None:
        """Open a CONNECT tunnel to the embedded mitmproxy; the client's bytes follow."""
        assert self.mitm_address is not None
        loop = asyncio.get_running_loop()
        try:
            transport, side = await loop.create_connection(Side, *self.mitm_address)
        except OSError as exc:
            state.close_reason = f"error: interception proxy: {exc}"[:200]
            return None
        conn = state.conn
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        side.write(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"{LW_CONN_HEADER}: {conn.uid} {conn.client_ip} {conn.client_port}\r\n\r\n".encode()
        )
        # mitmproxy answers "200 Connection established" before anything else.
        while b"\r\n\r\n" not in side.buf:
            if not await side.wait_more():
                state.close_reason = "error: interception proxy closed the tunnel"
                side.close()
                return None
        head, _, rest = bytes(side.buf).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            state.close_reason = f"error: interception proxy said {head[:40]!r}"
            side.close()
            return None
        side.buf[:] = rest
        # Bytes through mitmproxy are counted on the client side; the server side
        # is mitmproxy's own socket (its NAT address comes back via nat_table).
        state.upstream = side
        state.upstream_is_mitm = True
        return side

    async def splice_raw(self, state: ConnState, client: Side, host: str, port: int) -> None:
        """Tunnel content that is neither TLS nor HTTP: passed through, recorded."""
        upstream = await self.connect(state, host, port)
        if upstream is None:
            return
        splice(client, upstream, self.config.relay)
        await spliced(client, upstream)
        state.close_reason = state.close_reason or "fin"


LW_CONN_HEADER = "X-Linewarden-Conn"
"""Header of the loopback CONNECT to mitmproxy: ``uid client_ip client_port``, so
that the addon's records carry the real client and the connection's uid."""


@dataclass(slots=True)
class ConnState:
    """What one connection accumulated, for its conn record."""

    conn: ConnInfo
    service: str | None = None
    close_reason: str | None = None
    upstream: Side | None = None
    upstream_is_mitm: bool = False
    intercepted: bool = False
    bytes_down: int = 0
    action: str = "allow"
    rule_ids: list[str] = field(default_factory=list)
    ruleset_version: int | None = None

    def note(self, verdict: Verdict) -> None:
        """Fold a decision into the connection's action and rule ids."""
        if verdict.matches:  # none: "allow" and no ids, nothing to fold (nearly every decision)
            if ACTIONS.index(verdict.action) > ACTIONS.index(self.action):  # type: ignore[arg-type]
                self.action = verdict.action
            for rid in verdict.rule_ids:
                if rid not in self.rule_ids:
                    self.rule_ids.append(rid)
        elif verdict.action != "allow" and ACTIONS.index(verdict.action) > ACTIONS.index(self.action):  # type: ignore[arg-type]
            self.action = verdict.action  # an error's fail-closed block carries no match
        self.ruleset_version = verdict.ruleset_version or self.ruleset_version


class TlsDecision:
    """What was decided on one ClientHello; its tls record is written from this."""

    __slots__ = ("verdict", "sni", "alpn", "versions", "intercept", "ts")

    def __init__(self, verdict: Verdict, sni: str | None, alpn: list[str], versions: list[str]) -> None:
        self.verdict = verdict
        self.sni = sni
        self.alpn = alpn
        self.versions = versions
        self.intercept = False
        self.ts = 0
        """When it was decided (µs UTC): the tls record's ``ts``."""


@dataclass(frozen=True, slots=True)
class Resume:
    """How far the C passthrough got with a connection it hands to this path."""

    ts: int
    """Accept time, µs UTC."""
    peer: tuple[str, int]
    """The client's address as accept() gave it (the socket may be reset by now)."""
    data: bytes
    """What it read and did not act on: all of it, or what followed an answered CONNECT head."""
    connect_head: int = 0
    """Bytes of the CONNECT head it answered with 200 (a head this path answered before); 0: none."""
    dst: tuple[str, int] | None = None
    """That CONNECT's target."""


# Stages of a connection that ``_AcceptedSide`` drives, in order.
_FIRST, _TUNNEL, _HELLO, _CONNECTING, _RELAY, _TASK, _DONE = range(7)

STOP_TIMEOUT = 5.0
"""Seconds ``stop`` waits for closed connections to report their last bytes (their
``connection_lost``) so that their conn records are written before the store closes."""


class _AcceptedSide(Side):
    """The client side of a new connection, driven by its own callbacks as far as they go.

    Why callbacks: a TLS passthrough connection (a ``CONNECT`` or a redirected
    443, a ClientHello, the SNI decision, a connect, a short relay) is the proxy's
    commonest job and its shortest, and as a task it paid a dozen coroutine steps,
    futures and timers on top of its reads and writes. The stages: the first bytes
    (``_FIRST``); after a ``CONNECT``, the tunnel's first bytes (``_TUNNEL``); the
    ClientHello (``_HELLO``); the upstream connect (``_CONNECTING``: the
    ``create_connection`` coroutine, stepped by ``_Connect`` from the futures it
    awaits); the transports' relay (``_RELAY``). Their time limits (first bytes,
    connect) are deadlines that one timer checks for all connections (``FastPath._sweep``),
    and the ends of the relay come as direct calls (``Side.on_lost``, ``_Joined.on_end``).
    Everything else goes on in a task from where the callbacks stopped (``_TASK``,
    the code of the task path, so the same bytes get the same answers and records):
    plain HTTP, HTTP or other bytes inside a tunnel, a ``CONNECT`` head not whole
    in the first read or one the HTTP path refuses, interception, and a transfer
    the socket relay takes over.
    """

    def __init__(self, fastpath: FastPath, resume: Resume | None = None) -> None:
        super().__init__()
        self._fp = fastpath
        self._resume = resume
        """Where the C passthrough left the connection (it read the first bytes), or None."""
        self._stage = _FIRST
        self._state: ConnState | None = None
        self._dst: tuple[str, int] | None = None
        """Where the tunnel goes: the ``CONNECT`` target, or the redirected destination."""
        self._connecting: _Connect | None = None
        self._decision: TlsDecision | None = None
        self._open_ends = 0

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No TCP_NODELAY call here or on upstream sockets: asyncio and uvloop set it
        # on every TCP transport they create.
        super().connection_made(transport)
        fp = self._fp
        fp.stats.connections += 1
        fp.stats.active += 1
        fp._lean.add(self)
        resume = self._resume
        if resume is None:
            self._state = state = ConnState(fp._conn_info(self))
        else:
            self._state = state = ConnState(fp.conn_info(resume.peer[0], resume.peer[1], resume.ts))
        if fp.config.mode == "transparent":
            dst = fp._original_dst(self)
            if dst is None:
                state.close_reason = "error: not a redirected connection"
                self._end()
                return
            state.conn.server_ip, state.conn.server_port = self._dst = dst
        if resume is None:
            fp._wait(self, FIRST_BYTES_TIMEOUT)
            return
        self._resume = None
        if not resume.data:
            fp._wait(self, FIRST_BYTES_TIMEOUT - (now_us() - resume.ts) / 1e6)
        if resume.connect_head:
            # The C passthrough answered this CONNECT (a head this path answered before).
            self.bytes_in += resume.connect_head
            state.service = "http"
            state.conn.server_ip, state.conn.server_port = self._dst = resume.dst
            self._stage = _TUNNEL
        if resume.data:
            self.data_received(resume.data)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._stage < _CONNECTING:
            self._advance()

    def eof_received(self) -> bool:
        keep_open = super().eof_received()
        if self._stage < _CONNECTING:
            self._advance()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._stage < _CONNECTING:
            self._advance()

    # -- the stages -----------------------------------------------------------

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """Run one step of the callbacks: their one ``except`` (STYLE.md 5)."""
        try:
            step(*args)
        except Exception as exc:  # anything unexpected ends this connection only
            self._fp._failed(self._state, exc)  # type: ignore[arg-type]
            self._end()

    def _advance(self) -> None:
        """New bytes or an EOF before the connect."""
        stage = self._stage
        self._guarded(self._first if stage == _FIRST else self._tunnel if stage == _TUNNEL else self._hello)

    def expired(self) -> None:
        """Its wait is over (``FastPath._sweep``): no byte within ``FIRST_BYTES_TIMEOUT``
        of the accept, or no connection within ``connect_timeout``."""
        self._guarded(self._expire)

    def _expire(self) -> None:
        if self._stage == _FIRST:
            self._state.close_reason = self._state.close_reason or "timeout"  # type: ignore[union-attr]
            self._end()
        elif self._stage == _CONNECTING and self._connecting is not None:
            self._connecting.cancel()  # ``_connected`` records the timeout

    def _first(self) -> None:
        self._fp._waits.pop(self, None)
        state = self._state
        assert state is not None
        if not self.buf:
            state.close_reason = "fin"  # closed before sending anything
            self._end()
            return
        if self._dst is not None:  # transparent mode
            if looks_like_tls(self.buf):
                self._begin_hello()
            else:
                self._to_task(_http().HttpExchange(self._fp, state, self, self._dst).run())
            return
        if not self._connect_head():
            self._to_task(_http().HttpExchange(self._fp, state, self, None).run())

    def _connect_head(self) -> bool:
        """Answer a whole ``CONNECT`` head that came in the first read, as the HTTP path
        would (``HttpExchange._connect``); False leaves the connection to that path
        (any other request, a head still incomplete, or one it must refuse)."""
        buf = self.buf
        if not buf.startswith(b"CONNECT "):
            return False
        end = buf.find(b"\r\n\r\n") + 4
        if end < 4:
            return False
        target = _connect_target(bytes(buf[:end]))
        if target is None:
            return False
        host, port, is_ip = target
        state = self._state
        assert state is not None
        state.service = "http"
        self.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if is_ip and self._fp.native is not None:
            self._fp.native.remember_head(bytes(buf[:end]), host, port)
        if is_ip:
            state.conn.server_ip = host
        state.conn.server_port = port
        del buf[:end]  # what follows the head is the tunnel's
        self._dst = (host, port)
        self._stage = _TUNNEL
        if buf or self.eof:
            self._tunnel()
        return True

    def _tunnel(self) -> None:
        """The tunnel's first bytes say what it carries: TLS, HTTP or anything else."""
        state = self._state
        assert state is not None and self._dst is not None
        if not self.buf:
            if self.eof:
                state.close_reason = "fin"
                self._end()
            return
        host, port = self._dst
        if looks_like_tls(self.buf):
            self._begin_hello()
        elif _http()._looks_like_http(bytes(self.buf[:8])):
            self._to_task(_http().HttpExchange(self._fp, state, self, self._dst).run())
        else:
            state.service = None
            self._to_task(self._fp.splice_raw(state, self, host, port))

    def _begin_hello(self) -> None:
        self._state.service = "tls"  # type: ignore[union-attr]
        self._stage = _HELLO
        self._hello()

    def _hello(self) -> None:
        """Parse the ClientHello once it is whole (``_read_hello``, by callbacks)."""
        try:
            hello: ClientHello | None = parse_client_hello(bytes(self.buf))
        except NeedMoreData:
            if len(self.buf) > MAX_CLIENT_HELLO_BYTES + 1024:
                hello = None
            elif not self.eof:
                return  # the rest is on its way
            else:
                try:
                    hello = parse_client_hello(bytes(self.buf), partial=True)
                except (InputError, NeedMoreData):
                    hello = None
        except InputError:
            hello = None
        self._decide(hello)

    def _decide(self, hello: ClientHello | None) -> None:
        fp, state, dst = self._fp, self._state, self._dst
        assert state is not None and dst is not None
        decision = fp.tls_decision(state, hello)
        if hello is not None and fp.native is not None and not decision.intercept:
            fp.native.remember_sni(hello.sni, decision.verdict)
        if decision.verdict.action == "block":
            fp.tls_block(state, self, decision)
            self._end()
            return
        if decision.intercept:
            self._to_task(fp.tls_intercept(state, self, dst[0], dst[1], decision))
            return
        fp.stats.tls_passthrough += 1
        self._decision = decision
        self._stage = _CONNECTING
        connect = asyncio.get_running_loop().create_connection(Side, dst[0], dst[1])
        self._connecting = connecting = _Connect(connect, self._connected)
        fp._wait(self, fp.config.connect_timeout)
        connecting.start()

    def _connected(self, result: tuple[asyncio.BaseTransport, Side] | None, exc: BaseException | None) -> None:
        """The connect is over: record the decision, then relay (or end)."""
        self._connecting = None
        self._fp._waits.pop(self, None)
        self._guarded(self._after_connect, result, exc)

    def _after_connect(self, result: tuple[asyncio.BaseTransport, Side] | None, exc: BaseException | None) -> None:
        fp, state, dst = self._fp, self._state, self._dst
        assert state is not None and dst is not None and self._decision is not None
        upstream: Side | None = None
        if isinstance(exc, asyncio.CancelledError):
            if state.close_reason is not None:
                self._end()  # the proxy is stopping (``shutdown``)
                return
            fp.connect_failed(state, dst[0], dst[1], TimeoutError())  # the wait expired (``expired``)
        elif exc is None:
            assert result is not None
            transport, upstream = result
            fp.connected(state, transport, upstream)
        elif isinstance(exc, (OSError, TimeoutError)):
            fp.connect_failed(state, dst[0], dst[1], exc)
        else:
            raise exc
        fp.tls_record(state, self._decision)  # after connecting: it carries the server and NAT addresses
        if upstream is None or state.close_reason is not None:
            self._end()
            return
        self._relay(upstream)

    def _relay(self, upstream: Side) -> None:
        """The transports relay; the record is written once both ends are closed."""
        self._stage = _RELAY
        splice(self, upstream, self._fp.config.relay)
        joined = self.joined
        if joined is None or joined.ended:
            self._to_task(self._relayed(upstream))
        else:
            joined.on_end = self._relay_over

    async def _relayed(self, upstream: Side) -> None:
        """The rest of the relay in a task (the socket relay took over, or the relay
        ended before it started)."""
        await spliced(self, upstream)
        state = self._state
        assert state is not None
        state.close_reason = state.close_reason or ("rst" if self.reset or upstream.reset else "fin")

    def _relay_over(self) -> None:
        """A side closed (``_transports_closed``), or one received ``RELAY_AFTER`` bytes:
        the socket relay takes over in a task."""
        self._guarded(self._relay_ended)

    def _relay_ended(self) -> None:
        upstream = self._state.upstream  # type: ignore[union-attr]
        assert upstream is not None
        if self.joined is not None and self.joined.hand_over:
            self._to_task(self._relayed(upstream))
            return
        self.joined = upstream.joined = None
        self.close()
        upstream.close()
        for side in (self, upstream):
            if not side.lost:
                self._open_ends += 1
                side.on_lost = self._end_closed
        if not self._open_ends:
            self._relay_done()

    def _end_closed(self) -> None:
        self._open_ends -= 1
        if not self._open_ends:
            self._guarded(self._relay_done)

    def _relay_done(self) -> None:
        state = self._state
        assert state is not None and state.upstream is not None
        state.close_reason = state.close_reason or ("rst" if self.reset or state.upstream.reset else "fin")
        self._end()

    # -- leaving the callbacks ----------------------------------------------------

    def _to_task(self, work: Coroutine[Any, Any, None]) -> None:
        """Go on in a task, which closes the connection and records it at its end."""
        self._stage = _TASK
        self._fp._lean_left(self)
        self._fp._continue(self, self._state, work)  # type: ignore[arg-type]

    def _end(self) -> None:
        """Close both ends and write the conn record (once)."""
        if self._stage >= _TASK:
            return
        self._stage = _DONE
        self._fp._lean_left(self)
        self._fp._closed(self._state, self)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        """The proxy is stopping: end this connection; its record says ``shutdown``."""
        state = self._state
        if state is None or self._stage >= _TASK:
            return
        state.close_reason = state.close_reason or "shutdown"
        if self._stage == _CONNECTING:
            assert self._connecting is not None
            self._connecting.cancel()  # ``_connected`` ends it
        elif self._stage == _RELAY:
            self.close()  # the relay ends; ``_relay_over`` records it once both ends are closed
            if state.upstream is not None:
                state.upstream.close()
        else:
            self._end()


ConnectDone = Callable[[tuple[asyncio.BaseTransport, Side] | None, BaseException | None], None]
"""Told how a connect ended: (transport, side) and None, or None and the exception."""


class _Connect:
    """``loop.create_connection(Side, host, port)`` (or ``connect_accepted_socket``: a
    connection the C passthrough hands over) driven by the futures it awaits, not
    by a task: ``start`` steps the coroutine at once (its connect(2) goes out from the
    callback that decided, not a loop pass later), each awaited future's done callback
    steps it again, and the end goes to ``done``. A task costs a connection ~10 µs of
    its own (the task, its context, a loop pass for each step). ``cancel`` does what
    ``Task.cancel`` does: it cancels the awaited future, and the coroutine meets
    CancelledError there (uvloop closes the half-made transport and re-raises it)."""

    __slots__ = ("_coro", "_done", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], done: ConnectDone) -> None:
        self._coro = coro
        self._done = done
        self._waiting: asyncio.Future[Any] | None = None

    def start(self) -> None:
        self._step(None)

    def _step(self, _: object) -> None:
        self._waiting = None
        try:
            awaited = self._coro.send(None)
        except StopIteration as stop:
            self._done(stop.value, None)
            return
        except (Exception, asyncio.CancelledError) as exc:  # the connect's end, whatever it is
            self._done(None, exc)
            return
        if awaited is None:  # a bare yield: go on in the next loop pass, as a task would
            asyncio.get_running_loop().call_soon(self._step, None)
            return
        awaited._asyncio_future_blocking = False
        self._waiting = awaited
        awaited.add_done_callback(self._step)

    def cancel(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()


CONNECT_MEMO_MAX = 4096
"""CONNECT heads whose parse is remembered (``_connect_target``); the memo is
cleared when full. A client sends the same head for every connection to a host
(curl's and browsers' carry only the target, Host, User-Agent and
Proxy-Connection), and a gateway sees the same few thousand hosts again and again."""

CONNECT_MEMO_HEAD_BYTES = 1024
"""Longest head kept in the memo (a browser's CONNECT is 100-250 bytes): bounds
its memory to ``CONNECT_MEMO_MAX`` KiB."""

_connect_memo: dict[bytes, tuple[str, int, bool]] = {}


def _connect_target(head: bytes) -> tuple[str, int, bool] | None:
    """(host, port, host is an address literal) of a ``CONNECT`` head that ends with
    ``head``'s last byte, as the HTTP path reads it (``rules.wire``, then
    ``_split_authority``); None when that path must answer it (not a CONNECT, a
    malformed head or target).

    The result depends on the bytes alone (``Http1Stream`` is sans-IO, and the
    tunnel's bytes after the head are never parsed), so it is remembered: parsing
    the head (llhttp, the framing checks) was about a tenth of the CPU of a TLS
    passthrough connection."""
    hit = _connect_memo.get(head)
    if hit is not None:
        return hit
    stream = Http1Stream(is_request=True)
    events = stream.feed(head)
    first = events[0] if events else None
    if not isinstance(first, Head) or first.method != "CONNECT" or stream.offset != len(head):
        return None
    http = _http()
    try:
        host, port = http._split_authority((first.target or b"").decode("latin-1"), 443)
    except http._Refused:
        return None
    target = (host, port, http._is_ip(host))
    if len(head) <= CONNECT_MEMO_HEAD_BYTES:
        if len(_connect_memo) >= CONNECT_MEMO_MAX:
            _connect_memo.clear()
        _connect_memo[head] = target
    return target


_http_module = None


def _http():  # type: ignore[no-untyped-def]
    """``proxy.fastpath_http``, imported on first use (it imports this module)."""
    global _http_module
    if _http_module is None:
        import proxy.fastpath_http as module

        _http_module = module
    return _http_module


async def _read_hello(client: Side):  # type: ignore[no-untyped-def]
    """The parsed ClientHello, waiting for more segments as needed; None if not TLS."""
    while True:
        try:
            return parse_client_hello(bytes(client.buf))
        except NeedMoreData:
            if len(client.buf) > MAX_CLIENT_HELLO_BYTES + 1024:
                return None
            if not await client.wait_more():
                try:
                    return parse_client_hello(bytes(client.buf), partial=True)
                except (InputError, NeedMoreData):
                    return None
        except InputError:
            return None


def _plain_ip(ip: str) -> str:
    """``::ffff:10.0.0.1`` → ``10.0.0.1``; zone ids dropped."""
    if "%" in ip:
        ip = ip.split("%", 1)[0]
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip
