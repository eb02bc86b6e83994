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

Must not: decide (the Engine does), parse TLS (``proxy.tlshello``) or HTTP
(``rules.wire``), or write SQL (records go to ``submit``). Errors: one
``except`` per connection (``_serve``) turns anything unexpected into a closed
connection and a conn record with ``close_reason="error: ..."``; the listener
keeps serving everyone else (STYLE.md 5).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from proxy.http_records import ConnInfo, DnsNames, conn_record, new_uid, tls_record
from proxy.original_dst import original_dst
from proxy.relay import RelayMode, Side, splice, spliced
from proxy.tlshello import MAX_CLIENT_HELLO_BYTES, NeedMoreData, looks_like_tls, parse_client_hello
from rules.errors import InputError
from rules.verdict import ACTIONS, Verdict
from storage.records import Record

log = logging.getLogger(__name__)

Submit = Callable[[Record], bool]

TLS_ALERT_ACCESS_DENIED = bytes([21, 3, 3, 0, 2, 2, 49])
"""A fatal ``access_denied`` alert record (RFC 8446 6.2: "a valid certificate or
PSK was received, but when access control was applied, the sender decided not
to proceed"). Sent in the clear before any handshake: every client stops there."""

FIRST_BYTES_TIMEOUT = 30.0
"""Seconds a new connection may stay silent before it is closed (a client that
connects and waits holds a socket; browsers send at once)."""


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
    reuse_port: bool = False
    """Bind with SO_REUSEPORT so that several worker processes share the port
    (the kernel spreads connections over them by 4-tuple hash)."""


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
        self.address: tuple[str, int] | None = None

    @property
    def engine(self) -> object:
        return self.engine_ref.engine  # type: ignore[attr-defined]

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
        self._server = await loop.create_server(self._accepted, sock=sock, backlog=1024)
        self.address = sock.getsockname()[:2]
        log.info("fast path listening on %s:%d (%s mode)", *self.address, self.config.mode)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            # Python 3.12's wait_closed also waits for accepted connections: closed above.
            await self._server.wait_closed()
            self._server = None

    def _accepted(self) -> Side:
        return _AcceptedSide(self)

    # -- one connection ---------------------------------------------------------

    def _spawn(self, client: Side) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _conn_info(self, client: Side) -> ConnInfo:
        assert client.transport is not None
        peer = client.transport.get_extra_info("peername") or ("", 0)
        ip = _plain_ip(peer[0])
        info = ConnInfo(uid=new_uid(), ts=now_us(), client_ip=ip, client_port=peer[1])
        if self.identity is not None:
            info.account = self.identity.account_for(ip)  # type: ignore[attr-defined]
            info.client_mac = self.identity.mac_for(ip)  # type: ignore[attr-defined]
        return info

    async def _serve(self, client: Side) -> None:
        from proxy.fastpath_http import HttpExchange

        self.stats.connections += 1
        self.stats.active += 1
        conn = self._conn_info(client)
        state = ConnState(conn)
        try:
            dst: tuple[str, int] | None = None
            if self.config.mode == "transparent":
                dst = self._original_dst(client)
                if dst is None:
                    state.close_reason = "error: not a redirected connection"
                    return
                conn.server_ip, conn.server_port = dst
            await client.wait_data(FIRST_BYTES_TIMEOUT)  # no timer when they came with the accept
            if not client.buf:
                state.close_reason = "fin"
                return
            if looks_like_tls(bytes(client.buf[:3])) and dst is not None:
                await self.tls(state, client, dst[0], dst[1])
            else:
                await HttpExchange(self, state, client, dst).run()
        except TimeoutError:
            state.close_reason = state.close_reason or "timeout"
        except asyncio.CancelledError:
            state.close_reason = state.close_reason or "shutdown"
            raise
        except Exception as exc:  # the one edge: anything unexpected ends this connection only
            self.stats.errors += 1
            log.exception("connection %s failed", conn.uid)
            state.close_reason = f"error: {type(exc).__name__}: {exc}"[:200]
        finally:
            self.stats.active -= 1
            client.close()
            if state.upstream is not None:
                state.upstream.close()
            self._finish(state, client)

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

    def _finish(self, state: ConnState, client: Side) -> None:
        conn = state.conn
        if state.intercepted and conn.uid in self.nat_table:
            conn.nat_ip, conn.nat_port = self.nat_table.pop(conn.uid)
        if conn.dns_name is None and self.dns_names and conn.server_ip:
            conn.dns_name = self.dns_names(conn.client_ip, conn.server_ip)
        reason = state.close_reason or "fin"
        self.stats.by_reason[reason.split(":")[0]] = self.stats.by_reason.get(reason.split(":")[0], 0) + 1
        up = state.upstream
        self.submit(
            conn_record(
                conn,
                now_us(),
                service=state.service,
                bytes_up=client.bytes_in,
                bytes_down=up.bytes_in if up is not None else state.bytes_down,
                close_reason=reason,
                action=state.action,
                rule_ids=state.rule_ids,
                ruleset_version=state.ruleset_version,
            )
        )

    # -- TLS ----------------------------------------------------------------------

    async def tls(self, state: ConnState, client: Side, host: str, port: int) -> None:
        """Decide on the ClientHello, then block, intercept or splice."""
        state.service = "tls"
        hello = await _read_hello(client)
        engine = self.engine
        if hello is None:
            # Not TLS after all (or a broken hello): nothing to decide on by name.
            verdict = Verdict("block" if self.config.fail == "closed" else "allow",
                              ruleset_version=engine.version, errors=("tls: unparsable ClientHello",))  # type: ignore[attr-defined]
            sni, alpn, versions = None, [], []
        else:
            verdict = engine.tls(hello.sni)  # type: ignore[attr-defined]
            sni, alpn, versions = hello.sni, hello.alpn, hello.versions
        state.note(verdict)
        conn = state.conn
        if self.dns_names and conn.server_ip:
            conn.dns_name = self.dns_names(conn.client_ip, conn.server_ip)
        intercept = (
            verdict.action != "block"
            and self.mitm_address is not None
            and domain_in(sni, self.config.intercept)
            and not domain_in(sni, self.config.passthrough)
        )
        ts = now_us()

        def record() -> None:
            self.submit(tls_record(conn, ts, sni=sni, alpn=alpn, versions=versions,
                                   verdict=verdict, intercepted=intercept))

        if verdict.action == "block":
            self.stats.tls_blocked += 1
            record()
            client.write(TLS_ALERT_ACCESS_DENIED)
            state.close_reason = "blocked"
            return
        if intercept:
            self.stats.tls_intercepted += 1
            state.intercepted = True
            upstream = await self._mitm_tunnel(state, host, port)
            if upstream is None:
                record()
                return
            splice(client, upstream, self.config.relay)
            try:
                await spliced(client, upstream)
            finally:
                # mitmproxy's upstream socket (reported by the addon) is the NAT
                # address; it may reconnect during the handshake, so take the last.
                if conn.uid in self.nat_table:
                    conn.nat_ip, conn.nat_port = self.nat_table[conn.uid]
                record()
            state.close_reason = state.close_reason or ("rst" if client.reset or upstream.reset else "fin")
            return
        self.stats.tls_passthrough += 1
        upstream = await self.connect(state, host, port)
        record()  # after connecting: the record carries the server and NAT addresses
        if upstream is None:
            return
        splice(client, upstream, self.config.relay)
        await spliced(client, upstream)
        state.close_reason = state.close_reason or ("rst" if client.reset or upstream.reset else "fin")

    async def connect(self, state: ConnState, host: str, port: int) -> Side | None:
        """Open the upstream socket; fills server and NAT addresses. None on failure."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                transport, side = await loop.create_connection(Side, host, port)
        except (OSError, TimeoutError) as exc:
            state.close_reason = f"error: connect {host}:{port}: {exc}"[:200]
            return None
        conn = state.conn
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if peer:
            conn.server_ip, conn.server_port = _plain_ip(peer[0]), peer[1]
        if local:
            conn.nat_ip, conn.nat_port = _plain_ip(local[0]), local[1]
        state.upstream = side
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
        if ACTIONS.index(verdict.action) > ACTIONS.index(self.action):  # type: ignore[arg-type]
            self.action = verdict.action
        for rid in verdict.rule_ids:
            if rid not in self.rule_ids:
                self.rule_ids.append(rid)
        self.ruleset_version = verdict.ruleset_version or self.ruleset_version


class _AcceptedSide(Side):
    """The client side of a new connection: starts the connection's task."""

    def __init__(self, fastpath: FastPath) -> None:
        super().__init__()
        self._fastpath = fastpath

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No TCP_NODELAY call here or on upstream sockets: asyncio and uvloop set it
        # on every TCP transport they create.
        super().connection_made(transport)
        self._fastpath._spawn(self)


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
    ip = ip.split("%", 1)[0]
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip
