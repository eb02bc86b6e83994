"""The DNS shim: a recording, filtering DNS forwarder (asyncio + uvloop, dnslib).

Owns: the UDP and TCP listeners, forwarding to upstream resolvers (timeouts,
failover, health probes, TC → TCP), the answer cache, block answers (NXDOMAIN
or a per-category sinkhole), ECH stripping, and one ``Dns`` record per query
(plus an ``Alarm`` for each blocked one) handed to the storage writer's
``submit()``. Must not: decide what is blocked (it asks the Engine through
``EngineRef``), write SQL (the writer does), or crash on any packet.

Per query (rules kept):
1. Parse header + question only (``dns_fastpath.parse_query``); odd but valid
   queries are normalised with dnslib (``_slow``); malformed ones get FORMERR
   (RFC 1035 4.1.1) when they carry a usable header, else they are dropped;
   both are counted and recorded.
2. Ask the Engine about the name (memoised per engine). Blocked: answer
   NXDOMAIN or the category's sinkhole, never ask upstream.
3. Cache hit: render the stored wire answer (id, TTLs, question case, EDNS
   rewritten); a CNAME chain through a listed name is blocked (checked per
   engine, memoised on the entry).
4. Miss: identical questions in flight are coalesced; the query is sent over
   UDP to the first healthy upstream (random id, random source socket, RFC
   5452), retried on the next after ``timeout_ms`` or on SERVFAIL/REFUSED/a
   malformed answer, over TCP when the answer is truncated. SERVFAIL only when
   every upstream failed.
5. One record per query, submitted before the answer is sent; when the writer
   refuses it (fail-closed overflow policy) the client gets SERVFAIL instead.
   A cache hit's record is a copy of the previous hit's record for the same
   entry, client and question case with only the per-query fields replaced
   (``RECORD_MEMO_MAX``): building a 23-field record costs more than the rest
   of the hit path. Blocks are memoised the same way (their alarm too).
6. In a worker process, an answer given through such a memo is also put in the
   compiled hit path's table (``proxy/dns_hits.py``) with how long it holds:
   the same question from the same client is then answered and recorded in C
   until then, and its record is rebuilt from the same prototype in the main
   process.

Time: the adapter reads the clocks (``time.time_ns`` for record timestamps,
``time.monotonic`` for cache and timeouts) and passes them down (STYLE.md 2).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import random
import secrets
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import msgspec
from dnslib import EDNS0, HTTPS, QTYPE, DNSHeader, DNSQuestion, DNSRecord
from dnslib.buffer import Buffer

from linewarden.config import DnsConfig, parse_hostport
from proxy import dns_fastpath as fp
from proxy import dns_hits
from proxy.dns_cache import CacheEntry, DnsCache
from proxy.identity import Identity
from rules.verdict import Verdict, combine_action
from storage.records import Alarm, Dns

log = logging.getLogger("linewarden.dns")
_replace = msgspec.structs.replace

_rng = random.SystemRandom()
"""Query ids and source sockets come from the OS's CSPRNG: an off-path spoofer must
not predict them (RFC 5452 9.2; Mersenne Twister output can be reconstructed)."""

VERDICT_MEMO_MAX = 200_000
"""Names whose verdict is memoised per engine; the memo is cleared when full
(simpler and as good as LRU for a working set that fits)."""
RECORD_MEMO_MAX = 16_384
"""Cache-hit record prototypes kept, one per (cache entry, client ip, transport,
question case); cleared when full. A hit's record is ``replace(prototype, ts=...,
uid=..., client_port=..., dns_id=..., latency_us=...)``: measured 0.55 us against
2.3-3.1 us for building all 23 fields. ~600 bytes each: ~10 MB at most."""
MAX_INFLIGHT = 10_000
"""Distinct questions waiting for upstreams at once. Past it new misses get
SERVFAIL at once: memory stays bounded when upstreams stall under a flood."""
MAX_WAITERS = 64
"""Clients coalesced onto one in-flight question; more get SERVFAIL (a flood)."""
SWEEP_INTERVAL = 0.05
"""Seconds between scans for upstream timeouts: the resolution of ``timeout_ms``."""
TCP_MAX_QUEUED = 64
"""Unanswered queries one TCP client may pipeline before we stop reading from it."""
PORT_ZERO_ATTEMPTS = 20
"""Tries to find one ephemeral port free for both UDP and TCP (``listen = "...:0"``)."""
UDP_BATCH = 64
"""Datagrams read per loop wake-up before other work (upstream answers, TCP) gets a turn."""
UDP_HOLD_S = 0.002
"""How long the UDP listener pauses while the records' channel is backed up (``_hold_udp``)."""
HOLD_MAX_S = 2.0
"""Longest the listener holds in one backlog: a writer that busy is drained in far less
(tens of ms under a benchmark's flood); past it the store is stuck, and the configured
overflow policy, not the shim's silence, decides (fail-open keeps DNS answering)."""
MAX_UDP_QUERY = 4096
"""Bytes read per datagram; a query is far smaller (RFC 1035: 512 without EDNS)."""
PROBE_NAME = "."
"""Health probes ask for ./NS: any well-formed answer (even REFUSED) proves the upstream alive."""

ECH_KEY = 5
"""SvcParamKey ``ech`` (RFC 9460 14.3.2; draft-ietf-tls-svcb-ech)."""
MANDATORY_KEY = 0


class RecordSink(Protocol):
    """The storage writer, as the shim uses it: ``submit`` never awaits."""

    def submit(self, record: Any) -> bool: ...


class EngineState:
    """One engine and the memo of its DNS verdicts (they die together on swap)."""

    __slots__ = ("engine", "memo")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.memo: dict[tuple[str, int], Verdict] = {}

    def dns(self, qname: str, qtype: int) -> Verdict:
        key = (qname.lower(), qtype)
        v = self.memo.get(key)
        if v is None:
            if len(self.memo) >= VERDICT_MEMO_MAX:
                self.memo.clear()
            v = self.engine.dns(qname, qtype)
            self.memo[key] = v
        return v

    def dns_chain(self, names: Iterable[str]) -> Verdict:
        return self.engine.dns_chain(list(names))


class EngineRef:
    """The current Engine, swapped whole on reload (issue 7).

    A query reads ``ref.state`` once and uses it throughout, and ``swap`` is
    one attribute assignment, so every query sees exactly one rule set and a
    reload never mixes two.
    """

    __slots__ = ("state", "_watchers")

    def __init__(self, engine: Any) -> None:
        self.state = EngineState(engine)
        self._watchers: list[Callable[[], None]] = []

    @property
    def engine(self) -> Any:
        return self.state.engine

    def swap(self, engine: Any) -> None:
        self.state = EngineState(engine)
        for told in self._watchers:
            told()

    def watch(self, told: Callable[[], None]) -> None:
        """Call ``told`` after each swap, on the swapping thread: for what remembers an
        Engine's answers outside Python's reach (the C passthrough's verdicts), which a
        read of ``state`` per query cannot refresh."""
        self._watchers.append(told)


class Sinkhole(NamedTuple):
    v4: bytes | None
    v6: bytes | None


def parse_sinkholes(table: dict[str, tuple[str, ...]] | Any) -> dict[str, Sinkhole]:
    out = {}
    for category, addrs in table.items():
        v4 = v6 = None
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if ip.version == 4:
                v4 = ip.packed
            else:
                v6 = ip.packed
        out[category] = Sinkhole(v4, v6)
    return out


class Waiter(NamedTuple):
    """One client query waiting for an upstream answer."""

    data: bytes
    q: fp.Query
    client: tuple[str, int]
    transport: str
    send: Callable[[bytes], None]
    t_ns: int
    verdict: Verdict


class Upstream:
    """One upstream resolver: its sockets and its health."""

    def __init__(self, index: int, host: str, port: int) -> None:
        self.index = index
        self.addr = (host, port)
        self.sockets: list[UpstreamSocket] = []
        self.fails = 0
        self.down = False
        self.answered = 0
        self.timeouts = 0

    def ok(self) -> None:
        self.fails = 0
        self.down = False
        self.answered += 1

    def timed_out(self, threshold: int) -> None:
        self.timeouts += 1
        self.fails += 1
        if self.fails >= threshold and not self.down:
            self.down = True
            log.warning("dns upstream %s:%d marked down after %d failures", *self.addr, self.fails)


class Pending:
    """A question in flight to the upstreams."""

    __slots__ = ("key", "q", "wire", "waiters", "order", "attempt", "deadline", "sock", "id",
                 "last", "tcp")

    def __init__(self, key: bytes, q: fp.Query, wire: bytearray, order: list[Upstream]) -> None:
        self.key = key
        self.q = q
        self.wire = wire
        self.waiters: list[Waiter] = []
        self.order = order
        self.attempt = 0
        self.deadline = 0.0
        self.sock: UpstreamSocket | None = None
        self.id = 0
        self.last: bytes | None = None
        self.tcp = False


class UpstreamSocket(asyncio.DatagramProtocol):
    """One connected UDP socket to an upstream; matches answers to ``Pending`` by id."""

    def __init__(self, shim: DnsShim, upstream: Upstream) -> None:
        self.shim = shim
        self.upstream = upstream
        self.pending: dict[int, Pending] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sockname = transport.get_extra_info("sockname")
        self.local = (sockname[0], sockname[1]) if sockname else None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.shim._on_upstream(self, data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the timeout sweep fails the query over.
        self.shim.stats["upstream_errors"] += 1


class _TcpClient(asyncio.Protocol):
    """One TCP client: 2-byte length framing (RFC 1035 4.2.2), pipelining (RFC 7766 6.2.1.1)."""

    def __init__(self, shim: DnsShim) -> None:
        self.shim = shim
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.timer: asyncio.TimerHandle | None = None
        self.queued = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (peer[0], peer[1])
        shim = self.shim
        if len(shim._tcp_clients) >= shim.config.tcp_max_connections:
            shim.stats["tcp_refused"] += 1
            transport.close()
            return
        shim._tcp_clients.add(self)
        self._arm()

    def _arm(self) -> None:
        if self.timer:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.shim.config.tcp_idle_timeout_s, self._idle)

    def _idle(self) -> None:
        if self.transport and self.queued == 0:
            self.transport.close()
        else:
            self._arm()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._arm()
        while len(self.buf) >= 2:
            n = (self.buf[0] << 8) | self.buf[1]
            if len(self.buf) < 2 + n:
                break
            msg, self.buf = self.buf[2:2 + n], self.buf[2 + n:]
            self.queued += 1
            if self.queued >= TCP_MAX_QUEUED and not self.paused and self.transport:
                self.paused = True
                self.transport.pause_reading()
            self.shim._on_message(msg, self.peer, "tcp", self.send)

    def send(self, resp: bytes) -> None:
        self.queued -= 1
        if self.paused and self.queued < TCP_MAX_QUEUED // 2 and self.transport:
            self.paused = False
            self.transport.resume_reading()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(resp).to_bytes(2, "big") + resp)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        self.shim._tcp_clients.discard(self)
        self.transport = None


async def tcp_exchange(addr: tuple[str, int], wire: bytes, timeout: float) -> bytes:
    """One query over a fresh TCP connection; returns the answer's bytes."""

    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(addr[0], addr[1])
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            n = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(n)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


def strip_ech(wire: bytes) -> bytes | None:
    """Remove the ``ech`` SvcParam from every HTTPS/SVCB record; None when none had it.

    ``mandatory`` lists naming ``ech`` are edited too (RFC 9460 8: a client
    must skip a record whose mandatory keys are missing, and we want it used
    without ECH, not skipped). Signatures over the RRset no longer verify; a
    validating stub behind the gateway would reject it, which is the price of
    keeping SNI visible (deploy/README.md).
    """
    rec = DNSRecord.parse(wire)
    changed = False
    for rr in itertools.chain(rec.rr, rec.auth, rec.ar):
        if rr.rtype not in (fp.T_SVCB, fp.T_HTTPS):
            continue
        rd = rr.rdata
        if not isinstance(rd, HTTPS):
            raw = bytes(rd.data)
            rd = HTTPS.parse(Buffer(raw), len(raw))
            rr.rdata = rd
        params = []
        for k, v in rd.params:
            if k == ECH_KEY:
                changed = True
                continue
            if k == MANDATORY_KEY:
                keys = [bytes(v[i:i + 2]) for i in range(0, len(v), 2)]
                kept = [x for x in keys if x != ECH_KEY.to_bytes(2, "big")]
                if len(kept) != len(keys):
                    changed = True
                    if not kept:
                        continue
                    v = bytearray(b"".join(kept))
            params.append((k, v))
        rd.params = params
    return bytes(rec.pack()) if changed else None


def dnslib_answers(wire: bytes) -> list[str]:
    """Answer data as text via dnslib, for record types the fast path does not format."""
    rec = DNSRecord.parse(wire)
    return [str(rr.rdata) for rr in rec.rr]


class DnsShim:
    """The service: ``await start()``, ``await stop()``; bound addresses in ``udp_address``."""

    def __init__(
        self,
        config: DnsConfig,
        engine: EngineRef,
        writer: RecordSink,
        identity: Identity | None = None,
        *,
        upstreams: list[tuple[str, int]] | None = None,
        reuse_port: bool = False,
        uid_prefix: str | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.writer = writer
        self.identity = identity or Identity()
        addrs = upstreams if upstreams is not None else config.upstream_addresses()
        self.upstreams = [Upstream(i, h, p) for i, (h, p) in enumerate(addrs)]
        self.cache = DnsCache(config.cache_size, min_ttl=config.cache_min_ttl,
                              max_ttl=config.cache_max_ttl,
                              max_negative_ttl=config.cache_max_negative_ttl)
        self.sinkholes = parse_sinkholes(config.sinkhole)
        self.reuse_port = reuse_port
        self.stats: Counter[str] = Counter()
        self.inflight: dict[bytes, Pending] = {}
        self._reading = False
        self._stopping = False
        self._held_since: float | None = None
        self._tcp_server: asyncio.AbstractServer | None = None
        self._tcp_clients: set[_TcpClient] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._health: asyncio.Task[None] | None = None
        self._uid_prefix = uid_prefix or f"D{secrets.token_hex(3)}."
        self._uid = itertools.count(1)
        self._protos: dict[tuple[Any, ...], tuple[CacheEntry | None, Verdict, Any, Dns, Alarm | None]] = {}
        """RECORD_MEMO_MAX: (id(entry), client ip, transport, qname) for a cache hit, or
        ("block", client ip, transport, qname, qtype) for a block → (entry or None, verdict,
        identity binding, record, alarm or None).
        The entry, verdict and binding are held and compared by identity, so a reused id()
        or a reload (new verdicts) never matches."""
        self.fast = dns_hits.FastHits(writer, self._uid_prefix) if dns_hits.usable(writer) else None
        """The compiled hit path (proxy/dns_hits.py); None where the sink cannot take it."""
        self._listen = parse_hostport(config.listen, 53)
        self.udp_sock: socket.socket | None = None
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.name = "dns"

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Bind UDP and TCP on ``dns.listen``, open the upstream sockets, start the timers."""
        try:
            await self._start()
        except BaseException:
            await self.stop()  # nothing half-open stays behind (a bound port, a socket)
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self._listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(PORT_ZERO_ATTEMPTS if port == 0 else 1):
            # Port 0: one ephemeral port for both transports. TCP picks it, UDP joins
            # it; when another program holds that UDP port, pick again.
            self._tcp_server = await loop.create_server(
                lambda: _TcpClient(self), host, port, family=family, reuse_port=self.reuse_port)
            bound = self._tcp_server.sockets[0].getsockname()[1]
            udp_sock = socket.socket(family, socket.SOCK_DGRAM)
            if self.reuse_port:
                udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Bursts of queries arrive faster than one loop turn: a larger receive buffer
            # avoids drops (dnsmasq and unbound raise theirs too, so-rcvbuf).
            try:
                udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            except OSError:
                pass
            try:
                udp_sock.bind((host, bound))
                break
            except OSError:
                udp_sock.close()
                self._tcp_server.close()
                self._tcp_server = None
                if port != 0 or attempt == PORT_ZERO_ATTEMPTS - 1:
                    raise
        self.udp_sock = udp_sock
        udp_sock.setblocking(False)
        loop.add_reader(udp_sock.fileno(), self._udp_readable)
        self._reading = True
        self.udp_address = udp_sock.getsockname()[:2]
        self.tcp_address = self._tcp_server.sockets[0].getsockname()[:2]
        for up in self.upstreams:
            for _ in range(self.config.upstream_sockets):
                fam = socket.AF_INET6 if ":" in up.addr[0] else socket.AF_INET
                _, proto = await loop.create_datagram_endpoint(
                    lambda up=up: UpstreamSocket(self, up), remote_addr=up.addr, family=fam)
                up.sockets.append(proto)
        self._sweeper = asyncio.create_task(self._sweep_loop())
        self._health = asyncio.create_task(self._health_loop())
        log.info("dns shim on %s udp+tcp, upstreams %s", self.udp_address,
                 [u.addr for u in self.upstreams])

    async def stop(self) -> None:
        """Answer what is in flight with SERVFAIL (recorded), stop listening, close."""
        self._stopping = True
        for task in (self._sweeper, self._health, *self._tasks):
            if task is not None:
                task.cancel()
        # First the answers (the listeners are still open to send them), then the close.
        for p in list(self.inflight.values()):
            self._fail(p, time.monotonic())
        if self.udp_sock is not None:
            if self._reading:
                asyncio.get_running_loop().remove_reader(self.udp_sock.fileno())
                self._reading = False
            self.udp_sock.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for c in list(self._tcp_clients):
            if c.transport:
                c.transport.close()
        for up in self.upstreams:
            for s in up.sockets:
                if s.transport:
                    s.transport.close()
            up.sockets.clear()
        if self._tcp_server is not None:
            try:
                await asyncio.wait_for(self._tcp_server.wait_closed(), 1.0)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        await asyncio.sleep(0)

    # -- per packet ------------------------------------------------------------

    def _udp_readable(self) -> None:
        """Drain the UDP socket: up to ``UDP_BATCH`` datagrams per loop wake-up.

        A plain non-blocking socket read in a loop costs less per datagram than a
        transport callback each (measured: benchmarks/bench_dns.py), and a burst
        is served in one turn of the loop.
        """
        sock = self.udp_sock
        if sock is None:
            return
        on_udp = self._on_udp
        fast = self.fast
        if fast is not None:
            if self.writer.accepting():  # type: ignore[attr-defined]
                self._held_since = None
                self._serve_fast(fast, sock, on_udp)
                return
            now = time.monotonic()
            if self._held_since is None:
                self._held_since = now
            if now - self._held_since < HOLD_MAX_S:
                self._hold_udp()
                return
            # Held too long: the store is stuck, not busy. Answer on the Python path, whose
            # records meet the overflow policy (fail-open: counted drops; fail-closed: SERVFAIL).
        recv = sock.recvfrom
        for _ in range(UDP_BATCH):
            try:
                data, addr = recv(MAX_UDP_QUERY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.stats["udp_errors"] += 1
                return
            on_udp(data, addr)

    def _hold_udp(self) -> None:
        """The main process is behind with the records: stop reading for ``UDP_HOLD_S``.

        Flow control, not the overflow policy: queries wait in the socket's buffer (the
        kernel drops past it and clients retry), so the shim answers no faster than the
        store records. Without it, answers would outrun the writer until its queue is
        full and the overflow policy dropped records (fail-open) or refused queries."""
        if not self._reading or self.udp_sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.udp_sock.fileno())
        self._reading = False
        self.stats["udp_held"] += 1

        def resume() -> None:
            if self.udp_sock is not None and not self._reading and not self._stopping:
                loop.add_reader(self.udp_sock.fileno(), self._udp_readable)
                self._reading = True

        loop.call_later(UDP_HOLD_S, resume)

    def _serve_fast(self, fast: dns_hits.FastHits, sock: socket.socket,
                    on_udp: Callable[[bytes, Any], None]) -> None:
        """The same ``UDP_BATCH`` datagrams a wake-up, read in one system call: hits are
        answered and recorded in C, the rest take the Python path one by one."""
        seq = next(self._uid)
        try:
            misses, after, unsent = fast.serve(sock.fileno(), seq, self.engine.state, UDP_BATCH)
        except OSError:
            self._uid = itertools.count(seq)
            self.stats["udp_errors"] += 1
            return
        self._uid = itertools.count(after)
        if after != seq:
            self.stats["queries"] += after - seq
            self.stats["fast_hits"] += after - seq
        if unsent:
            self.stats["udp_send_dropped"] += unsent
        for data, addr in misses:
            on_udp(data, addr)

    def _udp_sender(self, addr: Any) -> Callable[[bytes], None]:
        sock = self.udp_sock
        stats = self.stats

        def send(resp: bytes) -> None:
            try:
                sock.sendto(resp, addr)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                # Send buffer full: UDP may lose an answer; the client retries.
                stats["udp_send_dropped"] += 1
            except (OSError, AttributeError):
                stats["udp_errors"] += 1

        return send

    def _on_udp(self, data: bytes, addr: Any) -> None:
        t_ns = time.time_ns()
        try:
            q = fp.parse_query(data)
        except fp.FormatError as e:
            self._malformed(data, addr, "udp", self._udp_sender(addr), t_ns, str(e))
            return
        except fp.Decline:
            self._slow(data, addr, "udp", self._udp_sender(addr), t_ns)
            return
        self._query(data, q, addr, "udp", self._udp_sender(addr), t_ns)

    def _on_message(self, data: bytes, client: tuple[str, int], transport: str,
                    send: Callable[[bytes], None]) -> None:
        t_ns = time.time_ns()
        try:
            q = fp.parse_query(data)
        except fp.FormatError as e:
            self._malformed(data, client, transport, send, t_ns, str(e))
            return
        except fp.Decline:
            self._slow(data, client, transport, send, t_ns)
            return
        self._query(data, q, client, transport, send, t_ns)

    def _query(self, data: bytes, q: fp.Query, client: Any, transport: str,
               send: Callable[[bytes], None], t_ns: int) -> None:
        """Rules 2-4 of the module docstring; never raises (rule: bad input never stops us)."""
        try:
            self.stats["queries"] += 1
            state = self.engine.state
            verdict = state.dns(q.qname, q.qtype)
            if verdict.action == "block":
                self._block(data, q, client, transport, send, t_ns, verdict, False)
                return
            if q.qtype in (251, 252):
                # Zone transfers are not forwarded: a shim is no secondary server.
                self._finish(data, q, client, transport, send, t_ns, verdict,
                             fp.build_rcode(data, q, fp.NOTIMP), fp.NOTIMP, [], False, None)
                return
            now = time.monotonic()
            entry = self.cache.get(q.key, now)
            if entry is not None:
                self._from_entry(data, q, client, transport, send, t_ns, verdict, entry, state,
                                 now, True, None)
                return
            self._forward(data, q, Waiter(data, q, client, transport, send, t_ns, verdict), now)
        except Exception:  # the one edge where an unexpected error becomes SERVFAIL
            log.exception("dns shim: error on a query; answered SERVFAIL")
            self.stats["internal_errors"] += 1
            send(fp.build_rcode(data, q, fp.SERVFAIL))

    def _from_entry(self, data: bytes, q: fp.Query, client: Any, transport: str,
                    send: Callable[[bytes], None], t_ns: int, verdict: Verdict,
                    entry: CacheEntry, state: EngineState, now: float, hit: bool,
                    upstream: tuple[UpstreamSocket | None, Upstream] | None) -> None:
        if entry.cnames:
            memo = entry.chain
            if memo is None or memo[0] is not state:
                memo = entry.chain = (state, state.dns_chain(entry.cnames))
            chain: Verdict = memo[1]  # type: ignore[assignment]
            if chain.action != "allow":
                verdict = _merge(verdict, chain)
                if verdict.action == "block":
                    self._block(data, q, client, transport, send, t_ns, verdict, hit)
                    return
        wire = entry.wire
        # The rendered answer holds until the entry expires, its TTLs ageing (aged_body):
        # the hit path ages them likewise. Offsets into the render are the body's.
        self._finish(data, q, client, transport, send, t_ns, verdict,
                     wire.render(data, q, now), entry.rcode, entry.answers, hit, upstream,
                     entry=entry if hit and upstream is None else None, until=entry.expires,
                     aging=(wire.stored, wire.ttl_offsets, wire.ttls))

    def _block(self, data: bytes, q: fp.Query, client: Any, transport: str,
               send: Callable[[bytes], None], t_ns: int, verdict: Verdict, hit: bool) -> None:
        self.stats["blocked"] += 1
        category = next(m.category for m in verdict.matches if m.action == "block")
        hole = self.sinkholes.get(category)
        ttl = self.config.block_ttl
        if hole is None:
            resp, rcode, answers = fp.build_rcode(data, q, fp.NXDOMAIN), fp.NXDOMAIN, []
        else:
            addr = hole.v4 if q.qtype == fp.T_A else hole.v6 if q.qtype == fp.T_AAAA else None
            resp = fp.build_sinkhole(data, q, addr, ttl)
            rcode = fp.NOERROR
            answers = [socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6,
                                        addr)] if addr else []
        self._finish(data, q, client, transport, send, t_ns, verdict, resp, rcode, answers, hit,
                     None, alarm_category=category,
                     until=time.monotonic() + dns_hits.BLOCK_VALID_S)

    def _finish(self, data: bytes, q: fp.Query, client: Any, transport: str,
                send: Callable[[bytes], None], t_ns: int, verdict: Verdict, resp: bytes,
                rcode: int, answers: list[str], hit: bool,
                upstream: tuple[UpstreamSocket | None, Upstream] | None,
                alarm_category: str | None = None, entry: CacheEntry | None = None,
                until: float | None = None, aging: dns_hits.Aging | None = None) -> None:
        """Record, then answer (rule 5). ``entry``: the cache entry of a hit (prototype
        memo); ``until``: the monotonic time up to which ``resp`` is this question's answer
        (the hit path may serve it again until then, with its TTLs aged per ``aging``)."""
        if transport == "udp" and len(resp) > q.udp_size:
            # RFC 1035 4.2.1 / RFC 6891 7: too big for this client over UDP: TC, it retries on TCP.
            resp = fp.build_truncated(data, q)
            answers = []
            rcode = fp.NOERROR
            self.stats["truncated"] += 1
            entry = None
            until = None
        ip, port = client[0], client[1]
        ident = self.identity.lookup(ip)
        now_ns = time.time_ns()
        key: tuple[Any, ...] | None = None
        if entry is not None:
            key = (id(entry), ip, transport, q.qname)
        elif alarm_category is not None and until is not None and upstream is None:
            key = ("block", ip, transport, q.qname, q.qtype, hit)
        if key is not None:
            memo = self._protos.get(key)
            if memo is not None and memo[0] is entry and memo[1] is verdict and memo[2] is ident:
                self._from_memo(memo, data, q, ip, port, send, t_ns, now_ns, resp, until, transport, aging)
                return
        account = ident.account if ident else None
        mac = ident.mac if ident else None
        server = nat = None
        if upstream is not None:
            sock, up = upstream
            server = up.addr
            nat = sock.local if sock is not None else None
        rule_ids = [m.rule_id for m in verdict.matches]
        uid = f"{self._uid_prefix}{next(self._uid):x}"
        rec = Dns(
            ts=t_ns // 1000, uid=uid, account=account, client_ip=ip, client_port=port,
            client_mac=mac, server_ip=server[0] if server else None,
            server_port=server[1] if server else None, nat_ip=nat[0] if nat else None,
            nat_port=nat[1] if nat else None, action=verdict.action, rule_ids=rule_ids,
            ruleset_version=verdict.ruleset_version, qname=q.qname, qtype=q.qtype,
            qtype_name=fp.record_text(q.qtype), rcode=rcode, rcode_name=fp.rcode_text(rcode),
            answers=answers, dns_id=q.id, transport=transport, cache_hit=hit,
            latency_us=max(0, (now_ns - t_ns) // 1000),
        )
        alarm = None
        if alarm_category is not None:
            m = next(m for m in verdict.matches if m.action == "block")
            alarm = Alarm(
                ts=t_ns // 1000, uid=uid, account=account, client_ip=ip, client_port=port,
                client_mac=mac, action="block", rule_ids=rule_ids,
                ruleset_version=verdict.ruleset_version, alarm_kind="illegal_content",
                detail=f"dns query {q.qname} {fp.record_text(q.qtype)} blocked: category "
                       f"{alarm_category}, rule {m.rule_id} ({m.pattern}) on {m.where}",
            )
        if key is not None:
            if len(self._protos) >= RECORD_MEMO_MAX:
                self._protos.clear()
            self._protos[key] = (entry, verdict, ident, rec, alarm)
        ok = self.writer.submit(rec)
        if alarm is not None:
            ok = self.writer.submit(alarm) and ok
        if not ok:
            # Fail-closed overflow: nothing unrecorded gets an answer (DESIGN.md principles).
            self.stats["unrecorded"] += 1
            resp = fp.build_rcode(data, q, fp.SERVFAIL)
        elif key is not None and until is not None and self.fast is not None and transport == "udp":
            self.fast.learn(ip, data, resp, rec, alarm, until, aging)
        send(resp)

    def _from_memo(self, memo: tuple[CacheEntry | None, Verdict, Any, Dns, Alarm | None],
                   data: bytes, q: fp.Query, ip: str, port: int, send: Callable[[bytes], None],
                   t_ns: int, now_ns: int, resp: bytes, until: float | None, transport: str,
                   aging: dns_hits.Aging | None) -> None:
        """A repeated question: its record is the prototype's copy with the per-query fields."""
        uid = f"{self._uid_prefix}{next(self._uid):x}"
        ts = t_ns // 1000
        ok = self.writer.submit(_replace(memo[3], ts=ts, uid=uid, client_port=port, dns_id=q.id,
                                         latency_us=max(0, (now_ns - t_ns) // 1000)))
        if memo[4] is not None:
            ok = self.writer.submit(_replace(memo[4], ts=ts, uid=uid, client_port=port)) and ok
        if not ok:
            self.stats["unrecorded"] += 1
            send(fp.build_rcode(data, q, fp.SERVFAIL))
            return
        if until is not None and self.fast is not None and transport == "udp":
            self.fast.learn(ip, data, resp, memo[3], memo[4], until, aging)
        send(resp)

    def _malformed(self, data: bytes, client: Any, transport: str,
                   send: Callable[[bytes], None], t_ns: int, reason: str) -> None:
        self.stats["malformed"] += 1
        log.debug("dns shim: malformed packet from %s: %s", client, reason)
        try:
            resp = fp.header_only(data, fp.FORMERR)
            if resp is None:
                self.stats["dropped"] += 1
            ip, port = client[0], client[1]
            ident = self.identity.lookup(ip)
            self.writer.submit(Dns(
                ts=t_ns // 1000, uid=f"{self._uid_prefix}{next(self._uid):x}",
                account=ident.account if ident else None, client_ip=ip, client_port=port,
                client_mac=ident.mac if ident else None, transport=transport,
                dns_id=int.from_bytes(data[:2], "big") if len(data) >= 2 else None,
                rcode=fp.FORMERR if resp else None,
                rcode_name=("FORMERR" if resp else None),
                latency_us=max(0, (time.time_ns() - t_ns) // 1000),
            ))
            if resp is not None:
                send(resp)
        except Exception:
            log.exception("dns shim: error answering a malformed packet")
            self.stats["internal_errors"] += 1

    def _slow(self, data: bytes, client: Any, transport: str, send: Callable[[bytes], None],
              t_ns: int) -> None:
        """Valid queries the fast path declined: normalise with dnslib, then rules 2-5."""
        self.stats["slow_path"] += 1
        try:
            rec = DNSRecord.parse(data)
        except Exception as e:
            self._malformed(data, client, transport, send, t_ns, f"dnslib: {e}")
            return
        try:
            h = rec.header
            if h.opcode != 0:
                resp = fp.header_only(data, fp.NOTIMP)
                self._malformed_answered(data, client, transport, send, t_ns, resp, fp.NOTIMP)
                return
            if len(rec.questions) != 1:
                self._malformed(data, client, transport, send, t_ns, "not exactly one question")
                return
            opt = next((r for r in rec.ar if r.rtype == QTYPE.OPT), None)
            if opt is not None and (opt.ttl >> 16) & 0xFF != 0:
                # RFC 6891 6.1.3: unknown EDNS version → BADVERS (16 = ext-rcode 1, rcode 0).
                resp = struct.pack("!HHHHHH", h.id, 0x8000 | (0x100 if h.rd else 0) | 0x80,
                                   0, 0, 0, 1) + fp.opt_record(False, ext_rcode=1)
                self._malformed_answered(data, client, transport, send, t_ns, resp, 16)
                return
            clean = DNSRecord(DNSHeader(id=h.id, rd=h.rd, cd=h.cd), q=DNSQuestion(
                rec.q.qname, rec.q.qtype, rec.q.qclass))
            if opt is not None:
                clean.add_ar(EDNS0(udp_len=opt.rclass, flags="do" if opt.ttl & 0x8000 else ""))
            norm = bytes(clean.pack())
            q = fp.parse_query(norm)
        except Exception as e:
            self._malformed(data, client, transport, send, t_ns, f"slow path: {e}")
            return
        self._query(norm, q, client, transport, send, t_ns)

    def _malformed_answered(self, data: bytes, client: Any, transport: str,
                            send: Callable[[bytes], None], t_ns: int, resp: bytes | None,
                            rcode: int) -> None:
        ip, port = client[0], client[1]
        self.writer.submit(Dns(
            ts=t_ns // 1000, uid=f"{self._uid_prefix}{next(self._uid):x}",
            account=self.identity.account_for(ip), client_ip=ip, client_port=port,
            transport=transport, dns_id=int.from_bytes(data[:2], "big"), rcode=rcode,
            rcode_name=fp.rcode_text(rcode), latency_us=max(0, (time.time_ns() - t_ns) // 1000)))
        if resp is not None:
            send(resp)

    # -- upstreams -------------------------------------------------------------

    def _forward(self, data: bytes, q: fp.Query, waiter: Waiter, now: float) -> None:
        p = self.inflight.get(q.key)
        if p is not None:
            if len(p.waiters) >= MAX_WAITERS:
                self._answer_fail(waiter, None, now)
                return
            self.stats["coalesced"] += 1
            p.waiters.append(waiter)
            return
        if len(self.inflight) >= MAX_INFLIGHT or not self.upstreams:
            self.stats["overload" if self.upstreams else "no_upstream"] += 1
            self._answer_fail(waiter, None, now)
            return
        # Our own query: RD, the client's CD, its question, our OPT (DO as asked).
        wire = bytearray(struct.pack("!HHHHHH", 0, fp.RD | (q.flags & fp.CD), 1, 0, 0, 1)
                         + data[12:q.qend] + fp.opt_record(q.do))
        order = [u for u in self.upstreams if not u.down] + [u for u in self.upstreams if u.down]
        p = Pending(q.key, q, wire, order)
        p.waiters.append(waiter)
        self.inflight[q.key] = p
        self._send(p, now)

    def _send(self, p: Pending, now: float) -> None:
        up = p.order[p.attempt]
        if not up.sockets:
            self._next(p, now)
            return
        sock = _rng.choice(up.sockets)
        qid = _rng.getrandbits(16)
        while qid in sock.pending:
            qid = _rng.getrandbits(16)
        p.id = qid
        p.sock = sock
        p.wire[0] = qid >> 8
        p.wire[1] = qid & 0xFF
        sock.pending[qid] = p
        p.deadline = now + self.config.timeout_ms / 1000
        self.stats["upstream_queries"] += 1
        assert sock.transport is not None
        sock.transport.sendto(bytes(p.wire))

    def _next(self, p: Pending, now: float) -> None:
        p.attempt += 1
        if p.attempt < len(p.order):
            self.stats["failovers"] += 1
            self._send(p, now)
        else:
            self._fail(p, now)

    def _fail(self, p: Pending, now: float) -> None:
        """Every upstream failed: their last SERVFAIL/REFUSED answer, else SERVFAIL."""
        self.inflight.pop(p.key, None)
        if p.sock is not None:
            p.sock.pending.pop(p.id, None)
        self.stats["all_upstreams_failed"] += 1
        for w in p.waiters:
            self._answer_fail(w, p.last, now)

    def _answer_fail(self, w: Waiter, last: bytes | None, now: float) -> None:
        if last is not None:
            try:
                info = fp.walk_response(last)
                wire = fp.CachedWire(info, now)
                self._finish(w.data, w.q, w.client, w.transport, w.send, w.t_ns, w.verdict,
                             wire.render(w.data, w.q, now), info.rcode, [], False, None)
                return
            except Exception:
                pass
        self.stats["servfail"] += 1
        self._finish(w.data, w.q, w.client, w.transport, w.send, w.t_ns, w.verdict,
                     fp.build_rcode(w.data, w.q, fp.SERVFAIL), fp.SERVFAIL, [], False, None)

    def _on_upstream(self, sock: UpstreamSocket, data: bytes) -> None:
        if len(data) < 12:
            self.stats["upstream_malformed"] += 1
            return
        qid = (data[0] << 8) | data[1]
        p = sock.pending.get(qid)
        if p is None or data[12:p.q.qend].lower() != p.key[:-1]:
            # Late (already timed out) or not an answer to what we asked (RFC 5452 9.1).
            self.stats["upstream_unmatched"] += 1
            return
        del sock.pending[qid]
        self._answer(p, sock.upstream, sock, data, tcp=False)

    def _answer(self, p: Pending, up: Upstream, sock: UpstreamSocket | None, data: bytes,
                tcp: bool) -> None:
        now = time.monotonic()
        try:
            flags = (data[2] << 8) | data[3]
            if flags & fp.TC and not tcp:
                self.stats["upstream_truncated"] += 1
                p.tcp = True
                task = asyncio.get_running_loop().create_task(self._tcp_retry(p, up))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            try:
                info = fp.walk_response(data)
            except fp.FormatError:
                self.stats["upstream_malformed"] += 1
                up.timed_out(self.config.fail_threshold)
                self._next(p, now)
                return
            if info.rcode in (fp.SERVFAIL, fp.REFUSED):
                up.ok()
                p.last = data
                self._next(p, now)
                return
            up.ok()
            answers = info.answers
            if info.has_svcb and self.config.strip_ech:
                stripped = strip_ech(info.body)
                if stripped is not None:
                    self.stats["ech_stripped"] += 1
                    info = fp.walk_response(stripped)
                    answers = info.answers
            if info.needs_dnslib:
                answers = dnslib_answers(info.body)
            self.inflight.pop(p.key, None)
            entry = self.cache.put(p.key, info, answers, now)
            if entry is None:
                entry = CacheEntry(fp.CachedWire(info, now), now, info.rcode, answers,
                                   tuple(info.cnames))
            state = self.engine.state
            for w in p.waiters:
                self._from_entry(w.data, w.q, w.client, w.transport, w.send, w.t_ns, w.verdict,
                                 entry, state, now, False, (sock, up))
        except Exception:
            log.exception("dns shim: error handling an upstream answer")
            self.stats["internal_errors"] += 1
            self._fail(p, now)

    async def _tcp_retry(self, p: Pending, up: Upstream) -> None:
        """RFC 7766: the answer was truncated; ask the same upstream over TCP."""
        p.deadline = float("inf")
        try:
            data = await tcp_exchange(up.addr, bytes(p.wire), self.config.timeout_ms / 1000)
            if data[:2] != bytes(p.wire[:2]):
                raise ValueError("id mismatch")
        except (OSError, asyncio.TimeoutError, TimeoutError, asyncio.IncompleteReadError,
                ValueError):
            self.stats["upstream_tcp_failed"] += 1
            up.timed_out(self.config.fail_threshold)
            p.tcp = False
            self._next(p, time.monotonic())
            return
        p.tcp = False
        self.stats["upstream_tcp"] += 1
        self._answer(p, up, None, data, tcp=True)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            expired = [p for p in self.inflight.values() if p.deadline <= now and not p.tcp]
            for p in expired:
                if p.sock is not None:
                    p.sock.pending.pop(p.id, None)
                p.sock = None
                self.stats["upstream_timeouts"] += 1
                p.order[p.attempt].timed_out(self.config.fail_threshold)
                self._next(p, now)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            for up in self.upstreams:
                if up.down:
                    await self.probe(up)

    async def probe(self, up: Upstream) -> bool:
        """Ask ``up`` for ./NS over a fresh socket; any well-formed answer marks it up."""
        loop = asyncio.get_running_loop()
        qid = _rng.getrandbits(16)
        wire = bytes(DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(PROBE_NAME, QTYPE.NS)).pack())
        fut: asyncio.Future[bytes] = loop.create_future()

        class _Probe(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if not fut.done() and data[:2] == wire[:2]:
                    fut.set_result(data)

        fam = socket.AF_INET6 if ":" in up.addr[0] else socket.AF_INET
        transport = None
        try:
            transport, _ = await loop.create_datagram_endpoint(_Probe, remote_addr=up.addr,
                                                               family=fam)
            transport.sendto(wire)
            data = await asyncio.wait_for(fut, self.config.timeout_ms / 1000)
            fp.walk_response(data)
        except (OSError, asyncio.TimeoutError, TimeoutError, fp.FormatError):
            return False
        finally:
            if transport is not None:
                transport.close()
        if up.down:
            log.info("dns upstream %s:%d is back", *up.addr)
        up.fails = 0
        up.down = False
        return True


def _merge(a: Verdict, b: Verdict) -> Verdict:
    """The qname verdict and the CNAME-chain verdict as one (most severe action wins)."""
    matches = a.matches + tuple(m for m in b.matches if m.rule_id not in set(a.rule_ids))
    return Verdict(action=combine_action(matches), matches=matches,
                   ruleset_version=a.ruleset_version or b.ruleset_version)
