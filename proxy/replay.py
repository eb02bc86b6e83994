"""The offline adapter: captured packets → flows → HTTP/TLS/DNS decisions from the Engine.

Owns: the flow table (TCP connections and UDP DNS flows, both directions under one
entry, idle timeouts and a flow cap in capture time), choosing who is the client,
telling HTTP, TLS and DNS-over-TCP apart by their first bytes, pairing the n-th
HTTP response with the n-th request (keep-alive, pipelining, HEAD, 1xx), pairing
DNS answers with their queries, and turning each into a ``Decision``.
Must not: decide anything itself (every verdict is the Engine's, the same calls the
live proxy and DNS shim make), read files or the clock (time is the packets'
capture time, STYLE.md 2), or write records (linewarden/commands/replay.py does).

Sans-IO: ``Replay.packet(pkt)`` returns what that packet completed; ``finish()``
returns what was still open at the end. Bad traffic never raises out of here:
a malformed DNS message, a broken HTTP stream or a non-TLS byte on 443 is counted
in ``ReplayStats`` and, where a transaction was under way, noted in its
``Decision.errors``; later packets are still handled (STYLE.md 5).

HTTP pairing: the server's bytes are held until a request is waiting for them, so
a response's framing (no body after HEAD) is known even when capture order is
skewed. After missing bytes or a framing error, a direction is parsed again from
the next start line; a request head lost that way still takes its index, so the
responses that follow pair with the right requests.

Parallel replay: ``Replay(shard=(k, n))`` decides only the flows with
``(sport + dport) % n == k`` (symmetric, so both directions of a flow land in the
same shard); ``linewarden replay --jobs n`` runs n of them in worker processes.

Output order. A single replay outputs, for each packet in capture order: first
what the periodic sweep closed (idle TCP connections by last activity, then idle
UDP flows by last activity, then unanswered DNS queries by query order), then what
the packet itself completed; ``finish()`` closes the open TCP connections, then
the UDP flows, each by last activity. Every one of those orders can be rebuilt
from one shard's own flows, because
1. every shard sees every packet: the packet numbers, the replay clock (the latest
   capture time so far) and the moments of the sweeps are the same in all shards;
2. idle timeouts compare the clock with the clock at a flow's last packet
   (``seen``), which grows with the packet number, so the flows a sweep closes are
   the same ones whether or not another shard's flows sit between them;
3. with ``order_marks=True`` a shard puts an ``OrderMark`` (phase, the flow's
   last packet number or the query's packet number and index) before the outputs
   of each flow a sweep or ``finish()`` closes.
So sorting the shards' outputs by (packet number, phase, order, sub, shard,
position in the shard) gives exactly the single-process order. The one exception
is the flow cap: each shard keeps ``max_flows / n`` flows, so a capture that
overflows it evicts other flows than a single replay would.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import dnslib

from storage.communityid import community_id
from proxy.dns_fastpath import (
    HEADER, MAX_LABEL, RR_FIXED, T_A, T_AAAA, T_CNAME, T_OPT, FormatError, read_name, wire_name_text,
)
from proxy.pcap import TH_ACK, TH_FIN, TH_RST, TH_SYN, Packet, ip_text
from proxy.reassembly import Gap, HalfStream, ReassemblyLimits
from proxy.tlshello import MAX_CLIENT_HELLO_BYTES, NeedMoreData, looks_like_tls, parse_client_hello
from rules.errors import InputError
from rules.verdict import Match, Verdict, combine_action
from rules.wire import BodyData, EndOfMessage, Head, Http1Stream, ParseError

if TYPE_CHECKING:
    from rules.engine import BodyScan, Engine


@dataclass(frozen=True, slots=True)
class ReplayLimits:
    """Bounds on what the replay keeps in memory, in capture time."""

    max_flows: int = 200_000
    """Open TCP connections and UDP flows. Past it the least recently active
    tenth is closed (their open transactions decided, gaps flagged)."""
    tcp_idle_us: int = 300_000_000
    """A TCP connection silent this long is closed (Zeek's tcp_inactivity_timeout: 5 min)."""
    time_wait_us: int = 60_000_000
    """A closed TCP connection stays in the table this long to absorb its late
    packets (Linux' TIME-WAIT is 60 s) unless a new SYN reuses the 4-tuple."""
    udp_idle_us: int = 60_000_000
    """A UDP flow silent this long is closed (Zeek's udp_inactivity_timeout: 1 min)."""
    dns_answer_us: int = 10_000_000
    """A DNS query unanswered this long is decided without its answer
    (stub resolvers give up after 5 s × attempts; 10 s covers one retry)."""
    max_dns_pending: int = 65_536
    """Unanswered DNS queries kept per flow (one per possible message id)."""
    max_resolved: int = 100_000
    """(client, address) → name pairs remembered from DNS answers, for conn records'
    ``dns_name``; past it the oldest half is forgotten."""
    max_held_response_bytes: int = 1 << 20
    """Server bytes held while the request they answer is not yet parsed (so a
    response to HEAD is framed right even if capture order is skewed)."""
    body_batch_bytes: int = 64 * 1024
    """Body bytes gathered before being handed to the Engine's BodyScan: fewer,
    larger calls; the verdict is the same (the scan is incremental)."""
    classify_bytes: int = 8
    """Client bytes needed to tell HTTP from TLS from other (the longest method, ``OPTIONS ``)."""
    sweep_every_us: int = 5_000_000
    """How often (capture time) idle flows are looked for."""
    reassembly: ReassemblyLimits = field(default_factory=ReassemblyLimits)


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the Engine on one HTTP transaction, TLS handshake or DNS query."""

    kind: str
    """``http``, ``tls`` or ``dns``."""
    ts: int
    """Capture time (µs since the epoch, UTC) of the request head / ClientHello / query."""
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    index: int
    """0-based position of the transaction (or DNS query) in its connection or flow."""
    action: str
    matches: tuple[Match, ...] = ()
    ruleset_version: int = 0
    uid: str = ""
    """Id of the connection (shared with its ``ConnSummary``); empty from a replay
    made with ``flow_ids=False``, like ``community_id``."""
    community_id: str = ""
    client_mac: str | None = None
    errors: tuple[str, ...] = ()
    """Problems met deciding this item (missing TCP bytes, HTTP framing, decoding)."""
    truncated: bool = False
    # http
    method: str | None = None
    host: str | None = None
    url: str | None = None
    status: int | None = None
    content_type: str | None = None
    req_bytes: int = 0
    resp_bytes: int = 0
    user_agent: str | None = None
    referrer: str | None = None
    # tls
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    tls_version: str | None = None
    # dns
    qname: str | None = None
    qtype: int | None = None
    dns_id: int | None = None
    rcode: int | None = None
    answers: tuple[str, ...] = ()
    transport: str = "tcp"

    def to_json(self) -> dict[str, Any]:
        """The JSON line of issue 6: fields that do not apply to the kind are omitted."""
        client, server = _ep(self.client_ip, self.client_port), _ep(self.server_ip, self.server_port)
        out: dict[str, Any] = {
            "ts": self.ts,
            "kind": self.kind,
            "conn": f"{client}-{server}",
            "index": self.index,
            "client": client,
            "server": server,
        }
        if self.kind == "http":
            out.update(method=self.method, host=self.host, url=self.url, status=self.status)
        elif self.kind == "tls":
            out["sni"] = self.sni
        else:
            out.update(qname=self.qname, qtype=qtype_name(self.qtype), dns_id=self.dns_id)
        out["action"] = self.action
        out["matches"] = [
            {"rule_id": m.rule_id, "category": m.category, "kind": m.kind, "pattern": m.pattern,
             "action": m.action, "where": m.where, "snippet": m.snippet}
            for m in self.matches
        ]
        if self.errors:
            out["errors"] = list(self.errors)
        if self.truncated:
            out["truncated"] = True
        return out


@dataclass(frozen=True, slots=True)
class ConnSummary:
    """One TCP connection or UDP flow, when it ended (for the audit store's conn record)."""

    ts: int
    ts_end: int
    uid: str
    community_id: str
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    proto: str
    service: str | None
    bytes_up: int
    bytes_down: int
    close_reason: str
    action: str
    rule_ids: tuple[str, ...]
    ruleset_version: int
    client_mac: str | None = None
    dns_name: str | None = None
    """The name this client last resolved to the server address, in this capture."""
    missing_bytes: int = 0
    """Bytes never captured (TCP gaps), both directions."""


# Phases of the outputs of one packet number (see "Output order" above).
PHASE_SWEEP_TCP, PHASE_SWEEP_UDP, PHASE_SWEEP_DNS, PHASE_PACKET, PHASE_END_TCP, PHASE_END_UDP = range(6)


class OrderMark(NamedTuple):
    """In a replay made with ``order_marks=True``: the outputs that follow, up to
    the next mark or the next packet, were closed in this phase, for this flow."""

    phase: int
    order: int
    """The closed flow's last packet number, or the DNS query's packet number."""
    sub: int = 0
    """The DNS query's index in its flow (several queries can share a TCP packet)."""


_PACKET_MARK = OrderMark(PHASE_PACKET, 0)
"""Put after a sweep's outputs: what follows is the packet's own."""

type Output = Decision | ConnSummary | OrderMark
"""What a replay returns (``OrderMark`` only from one made with ``order_marks=True``)."""


class OrderKeys:
    """One shard's outputs → their sort keys in the single-process order.

    Fed ``(packet number, output)`` in the order the shard's replay (made with
    ``order_marks=True``) returned them; gives ``(packet number, phase, order, sub,
    shard, position)`` for each ``Decision``/``ConnSummary`` and None for marks.
    Sorting the keyed outputs of all shards (or merging them, as each shard's are
    already sorted) gives the order a single replay outputs them in.
    """

    __slots__ = ("shard", "position", "number", "group")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.position = 0
        self.number = -1
        self.group = (PHASE_PACKET, 0, 0)

    def key(self, number: int, output: Output) -> tuple[int, int, int, int, int, int] | None:
        if number != self.number:  # a new packet: its outputs are its own until a mark says otherwise
            self.number = number
            self.group = (PHASE_PACKET, 0, 0)
        if type(output) is OrderMark:
            self.group = (output.phase, output.order, output.sub)
            return None
        self.position += 1
        return (number, *self.group, self.shard, self.position)


@dataclass(slots=True)
class ReplayStats:
    packets: int = 0
    payload_bytes: int = 0
    tcp_flows: int = 0
    udp_flows: int = 0
    decisions: int = 0
    blocked: int = 0
    http_errors: int = 0
    tls_errors: int = 0
    dns_malformed: int = 0
    gaps: int = 0
    gap_bytes: int = 0
    evicted_flows: int = 0
    unparsed_bytes: int = 0
    """Server bytes dropped unparsed: the client never spoke (or not HTTP), or
    they passed ``max_held_response_bytes`` before the client did."""
    late_packets: int = 0
    """TCP packets after their connection closed (retransmissions, final ACKs): ignored."""

    @property
    def flows(self) -> int:
        return self.tcp_flows + self.udp_flows


def _ep(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def qtype_name(qtype: int | None) -> str | None:
    if qtype is None:
        return None
    name = dnslib.QTYPE.get(qtype)
    return name if isinstance(name, str) and not name.isdigit() else f"TYPE{qtype}"


def _mac_text(mac: bytes | None) -> str | None:
    return mac.hex(":") if mac else None


def _uid(cid: str, ts: int) -> str:
    """A connection id like Zeek's (``C`` + 16 characters), derived from the flow and
    its first packet time so that replaying the same capture gives the same ids."""
    digest = hashlib.sha1(f"{cid}|{ts}".encode()).digest()
    return "C" + base64.b32encode(digest[:10]).decode("ascii")


_HTTP_METHOD = re.compile(rb"[A-Z][A-Z-]{1,15} ")
# After missing bytes, parsing restarts at the first thing that looks like a start line.
# Not anchored to a line start: the lost bytes may have held the previous message's end,
# and a body need not end with a newline.
_HTTP_RESYNC = {
    True: re.compile(rb"((?:GET|POST|HEAD|PUT|DELETE|OPTIONS|PATCH|TRACE|CONNECT) [^ \r\n]+ HTTP/1\.[01]\r?\n)"),
    False: re.compile(rb"(HTTP/1\.[01] [1-5][0-9][0-9][ \r])"),
}
DNS_PORT = 53
_DNS_HEADER = HEADER.unpack_from
_RR_FIXED = RR_FIXED.unpack_from


# ---------------------------------------------------------------------------
# Flows


class _Flow:
    """State common to a TCP connection and a UDP flow."""

    __slots__ = ("replay", "cip", "cport", "sip", "sport", "client_addr", "first_ts", "last_ts", "uid", "cid",
                 "mac", "bytes_up", "bytes_down", "service", "worst", "rule_ids", "proto", "closed", "index", "keys",
                 "seen", "order")

    def __init__(self, replay: Replay, pkt: Packet, from_client: bool, proto: str) -> None:
        self.replay = replay
        src, sport, dst, dport = pkt.src, pkt.sport, pkt.dst, pkt.dport
        if not from_client:
            src, sport, dst, dport = dst, dport, src, sport
        self.client_addr = src
        """The client's packed address (with ``cport``: tells the directions apart)."""
        self.cip, self.cport, self.sip, self.sport = ip_text(src), sport, ip_text(dst), dport
        self.first_ts = self.last_ts = pkt.ts
        self.seen = replay._now
        """The replay clock (the latest capture time so far) at this flow's last packet:
        unlike ``last_ts`` it never goes back, so the tables ordered by activity are
        ordered by it too, and idle timeouts compare against it."""
        self.order = replay._number
        """Number of this flow's last packet in the capture (see Replay's ordering rules)."""
        if replay.flow_ids:
            self.cid = community_id(pkt.proto, src, sport, dst, dport)
            self.uid = _uid(self.cid, pkt.ts)
        else:
            self.cid = self.uid = ""
        self.mac = _mac_text(pkt.mac) if from_client else None
        self.bytes_up = self.bytes_down = 0
        self.service: str | None = None
        self.worst: list[Match] = []
        self.rule_ids: list[str] = []
        self.proto = proto
        self.closed = False
        self.index = 0
        self.keys: tuple[tuple[bytes, int, bytes, int], ...] = ()
        """The two flow-table keys (one per direction)."""

    def decision(self, kind: str, ts: int, verdicts: Iterable[Verdict], **fields: Any) -> Decision:
        matches: list[Match] = []
        errors: list[str] = list(fields.pop("errors", ()))
        truncated = False
        for v in verdicts:
            matches.extend(v.matches)
            errors.extend(v.errors)
            truncated = truncated or v.truncated
        index = fields.pop("index", None)
        if index is None:
            index = self.index
            self.index += 1
        action = combine_action(matches)
        for m in matches:
            if m.rule_id not in self.rule_ids:
                self.rule_ids.append(m.rule_id)
        self.worst.extend(m for m in matches if m.action == action)
        d = Decision(
            kind=kind, ts=ts, client_ip=self.cip, client_port=self.cport, server_ip=self.sip,
            server_port=self.sport, index=index, action=action, matches=tuple(matches),
            ruleset_version=self.replay.engine.version, uid=self.uid, community_id=self.cid,
            client_mac=self.mac, errors=tuple(errors), truncated=truncated, **fields,
        )
        self.replay.stats.decisions += 1
        if action == "block":
            self.replay.stats.blocked += 1
        return d

    def summary(self, reason: str, missing: int = 0) -> ConnSummary:
        return ConnSummary(
            ts=self.first_ts, ts_end=self.last_ts, uid=self.uid, community_id=self.cid,
            client_ip=self.cip, client_port=self.cport, server_ip=self.sip, server_port=self.sport,
            proto=self.proto, service=self.service, bytes_up=self.bytes_up, bytes_down=self.bytes_down,
            close_reason=reason, action=combine_action(self.worst), rule_ids=tuple(self.rule_ids),
            ruleset_version=self.replay.engine.version, client_mac=self.mac, missing_bytes=missing,
            dns_name=self.replay.resolved.get((self.cip, self.sip)) if self.proto == "tcp" else None,
        )


class _Txn:
    """One HTTP request/response pair under way."""

    __slots__ = ("index", "ts", "method", "url", "host", "headers", "req_scan", "req_verdict", "req_bytes",
                 "req_buf", "status", "content_type", "resp_scan", "resp_verdict", "resp_bytes", "resp_buf",
                 "errors", "buffered")

    def __init__(self, index: int, ts: int, head: Head | None, scan: BodyScan | None, host: str | None) -> None:
        self.index, self.ts = index, ts
        self.method = head.method if head else None
        self.url = (head.target or b"").decode("latin-1") if head else None
        self.host = host
        self.headers = head.headers if head else []
        self.req_scan: BodyScan | None = scan
        self.req_verdict: Verdict | None = None if scan else Verdict("allow")
        self.req_bytes = 0
        self.req_buf: list[bytes] = []
        self.status: int | None = None
        self.content_type: str | None = None
        self.resp_scan: BodyScan | None = None
        self.resp_verdict: Verdict | None = None
        self.resp_bytes = 0
        self.resp_buf: list[bytes] = []
        self.errors: list[str] = []
        self.buffered = 0
        """Body bytes in ``req_buf`` or ``resp_buf`` not yet given to the scan
        (only one of them fills at a time: a request body ends before its response's
        starts, except for early responses, where the batch is just smaller)."""


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class _TcpConn(_Flow):
    """One TCP connection: two half-streams and whatever protocol rides on them."""

    __slots__ = ("up", "down", "mode", "prefix", "held", "held_bytes", "req_stream", "resp_stream", "txns",
                 "next_txn", "resp_open", "hello", "hello_ts", "dns_bufs", "dns_pending", "fin_or_rst",
                 "reason", "resync")

    def __init__(self, replay: Replay, pkt: Packet, from_client: bool) -> None:
        super().__init__(replay, pkt, from_client, "tcp")
        lim = replay.limits.reassembly
        self.up = HalfStream(lim)
        self.down = HalfStream(lim)
        self.mode = "dns" if self.sport == DNS_PORT else "?"
        self.prefix = b""
        self.held: list[tuple[int, bytes | Gap]] = []
        self.held_bytes = 0
        self.req_stream: Http1Stream | None = None
        self.resp_stream: Http1Stream | None = None
        self.txns: deque[_Txn] = deque()
        self.next_txn = 0
        self.resp_open: _Txn | None = None
        self.hello = bytearray()
        self.hello_ts = 0
        self.dns_bufs: list[bytearray | None] = [bytearray(), bytearray()]
        self.dns_pending: dict[int, tuple[int, str, int, int]] = {}
        self.fin_or_rst = False
        self.reason = "end of capture"
        self.resync: list[bytes | None] = [None, None]
        """Per direction: None, or the tail kept while skipping to the next start line."""
        if self.mode == "dns":
            self.service = "dns"

    # -- packets -----------------------------------------------------------

    def packet(self, pkt: Packet, from_client: bool, out: list[Output]) -> None:
        self.last_ts = pkt.ts
        flags = pkt.flags
        half = self.up if from_client else self.down
        seq = pkt.seq
        if flags & TH_SYN:
            half.syn(seq)
            seq = (seq + 1) & 0xFFFFFFFF
        payload = pkt.payload
        if payload:
            if from_client:
                self.bytes_up += len(payload)
            else:
                self.bytes_down += len(payload)
        if flags & TH_RST:
            chunks = half.segment(seq, payload, False) if payload else []
            self._data(from_client, pkt.ts, chunks, out)
            self.reason = "rst"
            self.fin_or_rst = True
            self._close(out, "rst")
            return
        if payload or flags & TH_FIN:
            chunks = half.segment(seq, payload, bool(flags & TH_FIN))
            if chunks:
                self._data(from_client, pkt.ts, chunks, out)
            if flags & TH_FIN:
                self.fin_or_rst = True
                self.reason = "fin"
            if half.finished:
                self._eof(from_client, pkt.ts, out)
            if self.up.finished and self.down.finished:
                self._close(out, "fin")

    def _close(self, out: list[Output], reason: str) -> None:
        """End of the connection (both FINs, RST, timeout, eviction, end of capture)."""
        if self.closed:
            return
        ts = self.last_ts
        for from_client, half in ((True, self.up), (False, self.down)):
            rest = half.reset()
            if rest:
                self._data(from_client, ts, rest, out)
        self._eof(True, ts, out)
        self._eof(False, ts, out)
        self._release_held(ts, out, force=True)
        self._finish_http(out, ts)
        self._finish_tls(out, final=True)
        self._finish_dns(out)
        self.closed = True
        missing = self.up.stats.gap_bytes + self.down.stats.gap_bytes
        stats = self.replay.stats
        stats.gaps += self.up.stats.gaps + self.down.stats.gaps
        stats.gap_bytes += missing
        if self.replay.want_conns:
            out.append(self.summary(reason, missing))

    # -- classification ----------------------------------------------------

    def _data(self, from_client: bool, ts: int, chunks: list[bytes | Gap], out: list[Output]) -> None:
        if self.mode == "?":
            if not from_client:
                self._hold(ts, chunks, out)
                return
            for i, c in enumerate(chunks):
                if isinstance(c, Gap):
                    self.mode = "other"  # cannot tell what a stream with a hole at its start is
                    return
                self.prefix += c
                if len(self.prefix) >= self.replay.limits.classify_bytes:
                    self._classify()
                    rest = [self.prefix, *chunks[i + 1 :]]
                    self.prefix = b""
                    self._data(True, ts, rest, out)
                    self._release_held(ts, out)
                    return
            return
        mode = self.mode
        if mode == "http":
            if from_client:
                self._http_feed(True, ts, chunks, out)
            elif self.resp_open is not None and not self.held:
                self._http_feed(False, ts, chunks, out)  # the common case: inside a response
            else:
                self._hold(ts, chunks, out)
        elif mode == "tls":
            if from_client:
                self._tls(ts, chunks, out)
        elif mode == "dns":
            self._dns_tcp(from_client, ts, chunks, out)

    def _classify(self) -> None:
        p = self.prefix
        if looks_like_tls(p):
            self.mode, self.service = "tls", "tls"
        elif _HTTP_METHOD.match(p.lstrip(b"\r\n")):
            self.mode, self.service = "http", "http"
            self.req_stream = Http1Stream(True)
            self.resp_stream = Http1Stream(False)
        else:
            self.mode = "other"

    def _eof(self, from_client: bool, ts: int, out: list[Output]) -> None:
        if self.mode == "?" and from_client:
            if self.prefix:
                self._classify()
                rest: list[bytes | Gap] = [self.prefix]
                self.prefix = b""
                self._data(True, ts, rest, out)
            else:
                self.mode = "other"
        if self.mode == "http":
            if from_client and self.req_stream is not None:
                self._http_events(True, ts, self.req_stream.eof(), out)
                self._release_held(ts, out)
            elif not from_client and self.resp_stream is not None:
                self._release_held(ts, out, force=True)
                self._http_events(False, ts, self.resp_stream.eof(), out)
        elif self.mode == "tls" and from_client:
            self._finish_tls(out, final=True)

    # -- HTTP --------------------------------------------------------------

    def _hold(self, ts: int, chunks: list[bytes | Gap], out: list[Output]) -> None:
        """Server bytes wait while no request is outstanding for them (see ReplayLimits)."""
        if not self.held and self.mode == "http" and (
            self.resp_open is not None or self.next_txn > self._responses_started()
        ):
            self._http_feed(False, ts, chunks, out)  # a request is waiting
            return
        for c in chunks:
            self.held.append((ts, c))
            self.held_bytes += len(c) if isinstance(c, bytes) else 0
        self._release_held(ts, out)

    def _release_held(self, ts: int, out: list[Output], force: bool = False) -> None:
        if not self.held:
            return
        over = self.held_bytes > self.replay.limits.max_held_response_bytes
        if self.mode != "http":
            # Not HTTP (or the client has not spoken yet): the server's bytes are of
            # no use, and past the limit they are dropped rather than kept.
            if self.mode != "?" or force or over:
                self.replay.stats.unparsed_bytes += self.held_bytes
                self.held.clear()
                self.held_bytes = 0
            return
        waiting = self.next_txn > self._responses_started() or self.resp_open is not None
        if not (force or waiting or self.up.finished
                or self.held_bytes > self.replay.limits.max_held_response_bytes):
            return
        held, self.held, self.held_bytes = self.held, [], 0
        for hts, c in held:
            self._http_feed(False, hts, [c], out)

    def _responses_started(self) -> int:
        # Transactions whose response head has been seen: every one before the
        # first in ``txns`` that has no status, plus those finished (popped).
        started = self.next_txn - len(self.txns)
        for t in self.txns:
            if t.status is None:
                break
            started += 1
        return started

    def _http_feed(self, is_request: bool, ts: int, chunks: list[bytes | Gap], out: list[Output]) -> None:
        """One direction's bytes (and gaps) into its HTTP parser."""
        i = 0 if is_request else 1
        for c in chunks:
            if type(c) is Gap:
                self._http_gap(is_request, c, ts, out)
                continue
            if self.resync[i] is not None:
                c = self._resync_data(is_request, c)
                if not c:
                    continue
            # Looked up per piece: an event of the previous piece may have restarted the parser.
            stream = self.req_stream if is_request else self.resp_stream
            assert stream is not None
            self._http_events(is_request, ts, stream.feed(c), out)

    def _http_gap(self, is_request: bool, gap: Gap, ts: int, out: list[Output]) -> None:
        """Missing bytes: the message under way is decided on what was seen, with
        the gap in its errors; parsing restarts at the next message start line."""
        note = f"tcp: {gap.length} bytes missing from the {'client' if is_request else 'server'} stream"
        txn = self._current_txn(is_request)
        if txn is None and is_request:
            # Between requests (or inside a head): the missing bytes held a request head.
            txn = self._lost_request()
        if txn is None and not is_request:
            # Between responses (or inside a head): the missing bytes held the head
            # of the next response, so that transaction's response is lost, and the
            # next start line found answers the transaction after it.
            txn = next((t for t in self.txns if t.status is None), None)
            if txn is not None:
                txn.status = 0
        if txn is not None:
            txn.errors.append(note)
            self._end_body(txn, is_request)
            if not is_request and txn.resp_verdict is None:
                txn.resp_verdict = Verdict("allow", ruleset_version=self.replay.engine.version)
        self._restart(is_request)

    def _lost_request(self) -> _Txn:
        """A request whose head could not be read (missing bytes, bad syntax) still
        counts: indexes stay right, and its response pairs with it, not the next one."""
        txn = _Txn(self.next_txn, self.last_ts, None, None, None)
        self.next_txn += 1
        self.txns.append(txn)
        assert self.resp_stream is not None
        self.resp_stream.expect_method("GET")
        return txn

    def _restart(self, is_request: bool) -> None:
        """A fresh parser for one direction that first skips to the next start line
        (after missing bytes or a framing error: the flow continues where it can)."""
        self.resync[0 if is_request else 1] = b""
        if is_request:
            self.req_stream = Http1Stream(True)
        else:
            self.resp_stream = Http1Stream(False)
            self.resp_open = None
            for t in self.txns:
                if t.status is None:
                    self.resp_stream.expect_method(t.method or "GET")

    def _resync_data(self, is_request: bool, data: bytes) -> bytes:
        """``data`` as is, or while skipping to a start line: from the start line on."""
        i = 0 if is_request else 1
        tail = self.resync[i]
        if tail is None:
            return data
        buf = tail + data
        m = _HTTP_RESYNC[is_request].search(buf)
        if m is None:
            self.resync[i] = buf[-64:]  # keep a tail: a start line may straddle pieces
            return b""
        self.resync[i] = None
        return buf[m.start(1) :]

    def _current_txn(self, is_request: bool) -> _Txn | None:
        if is_request:
            if self.txns and self.txns[-1].req_verdict is None:
                return self.txns[-1]
            return None
        return self.resp_open

    def _http_events(self, is_request: bool, ts: int, events: list[Any], out: list[Output]) -> None:
        engine = self.replay.engine
        for ev in events:
            if type(ev) is BodyData:
                txn = self.resp_open if not is_request else self._current_txn(True)
                if txn is not None:
                    self._body(txn, is_request, ev.data)
            elif isinstance(ev, Head):
                if is_request:
                    host = _host_of(ev.target or b"", ev.headers)
                    scan = engine.request_scanner(ev.method or "GET", ev.target or b"", ev.headers)
                    txn = _Txn(self.next_txn, ts, ev, scan, host)
                    self.next_txn += 1
                    self.txns.append(txn)
                    assert self.resp_stream is not None
                    self.resp_stream.expect_method(ev.method or "GET")
                else:
                    status = ev.status or 0
                    if 100 <= status < 200 and status != 101:
                        continue  # interim response: the final one is still to come
                    txn = next((t for t in self.txns if t.status is None), None)
                    if txn is None:
                        self.replay.stats.http_errors += 1
                        continue  # a response with no request seen (capture began mid-connection)
                    txn.status = status
                    txn.content_type = _header(ev.headers, b"content-type")
                    txn.resp_scan = engine.response_scanner(status, ev.headers)
                    self.resp_open = txn
            elif isinstance(ev, EndOfMessage):
                txn = self._current_txn(is_request)
                if txn is None:
                    continue
                self._end_body(txn, is_request)
                if not is_request:
                    self.resp_open = None
                self._emit_done(out)
            elif isinstance(ev, ParseError):
                self.replay.stats.http_errors += 1
                note = f"http: {ev.reason} at byte {ev.offset} of the {'client' if is_request else 'server'} stream"
                txn = self._current_txn(is_request)
                if txn is None and is_request:
                    txn = self._lost_request()  # a bad head: it still takes its place in the order
                if txn is None and not is_request:
                    txn = next((t for t in self.txns if t.status is None), None)
                if txn is not None:
                    txn.errors.append(note)
                    self._end_body(txn, is_request)
                    if not is_request:
                        self.resp_open = None
                        if txn.resp_verdict is None:
                            txn.status = txn.status or 0
                            txn.resp_verdict = Verdict("allow", ruleset_version=self.replay.engine.version)
                self._emit_done(out)
                self._restart(is_request)

    def _body(self, txn: _Txn, is_request: bool, data: bytes) -> None:
        if is_request:
            txn.req_bytes += len(data)
            buf = txn.req_buf
        else:
            txn.resp_bytes += len(data)
            buf = txn.resp_buf
        buf.append(data)
        txn.buffered += len(data)
        if txn.buffered >= self.replay.limits.body_batch_bytes:
            scan = txn.req_scan if is_request else txn.resp_scan
            if scan is not None:
                scan.feed(b"".join(buf))
            buf.clear()
            txn.buffered = 0

    def _end_body(self, txn: _Txn, is_request: bool) -> None:
        if is_request:
            if txn.req_scan is not None and txn.req_verdict is None:
                if txn.req_buf:
                    txn.req_scan.feed(b"".join(txn.req_buf))
                    txn.req_buf.clear()
                    txn.buffered = 0
                txn.req_verdict = txn.req_scan.finish()
        elif txn.resp_scan is not None and txn.resp_verdict is None:
            if txn.resp_buf:
                txn.resp_scan.feed(b"".join(txn.resp_buf))
                txn.resp_buf.clear()
                txn.buffered = 0
            txn.resp_verdict = txn.resp_scan.finish()

    def _emit_done(self, out: list[Output]) -> None:
        """Decide, in order, every transaction whose request and response are both done."""
        while self.txns:
            t = self.txns[0]
            if t.req_verdict is None or t.resp_verdict is None:
                return
            self.txns.popleft()
            out.append(self._txn_decision(t))

    def _finish_http(self, out: list[Output], ts: int) -> None:
        """Connection over: decide what is left, with or without its response."""
        while self.txns:
            t = self.txns.popleft()
            if t.req_verdict is None:
                t.errors.append("http: connection ended inside the request")
                self._end_body(t, True)
            if t.status is not None and t.resp_verdict is None:
                t.errors.append("http: connection ended inside the response")
                self._end_body(t, False)
            out.append(self._txn_decision(t))

    def _txn_decision(self, t: _Txn) -> Decision:
        verdicts = [v for v in (t.req_verdict, t.resp_verdict) if v is not None]
        return self.decision(
            "http", t.ts, verdicts, index=t.index, errors=t.errors, method=t.method, host=t.host, url=t.url,
            status=t.status or None, content_type=t.content_type, req_bytes=t.req_bytes, resp_bytes=t.resp_bytes,
            user_agent=_header(t.headers, b"user-agent"), referrer=_header(t.headers, b"referer"),
        )

    # -- TLS ---------------------------------------------------------------

    def _tls(self, ts: int, chunks: list[bytes | Gap], out: list[Output]) -> None:
        if self.hello is None:
            return
        for c in chunks:
            if isinstance(c, Gap):
                self._finish_tls(out, final=True, note=f"tcp: {c.length} bytes missing inside the ClientHello")
                return
            self.hello += c
        self.hello_ts = ts
        if len(self.hello) > MAX_CLIENT_HELLO_BYTES + 1024:
            self._finish_tls(out, final=True)
        else:
            self._finish_tls(out, final=False)

    def _finish_tls(self, out: list[Output], final: bool, note: str | None = None) -> None:
        if self.mode != "tls" or self.hello is None:
            return
        try:
            hello = parse_client_hello(bytes(self.hello), partial=final)
        except NeedMoreData:
            return
        except InputError as e:
            self.replay.stats.tls_errors += 1
            self.hello = None  # type: ignore[assignment]
            note = f"{e}" if note is None else f"{note}; {e}"
            d = self.decision("tls", self.hello_ts or self.last_ts, [self.replay.engine.tls(None)],
                              index=0, errors=(note,))
            out.append(d)
            return
        self.hello = None  # type: ignore[assignment]
        errors = () if hello.complete else (note or "tls: ClientHello incomplete",)
        verdict = self.replay.engine.tls(hello.sni)
        out.append(self.decision("tls", self.hello_ts or self.last_ts, [verdict], index=0, errors=errors,
                                 sni=hello.sni, alpn=tuple(hello.alpn), tls_version=hello.max_version))

    # -- DNS over TCP (RFC 1035 §4.2.2: two-byte length prefix) ------------

    def _dns_tcp(self, from_client: bool, ts: int, chunks: list[bytes | Gap], out: list[Output]) -> None:
        buf = self.dns_bufs[0 if from_client else 1]
        if buf is None:
            return
        for c in chunks:
            if isinstance(c, Gap):
                # Length framing lost: the rest of this direction cannot be parsed.
                self.dns_bufs[0 if from_client else 1] = None
                self.replay.stats.dns_malformed += 1
                return
            buf += c
        while len(buf) >= 2:
            n = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + n:
                break
            msg = bytes(buf[2 : 2 + n])
            del buf[: 2 + n]
            self.replay._dns_message(self, msg, ts, from_client, "tcp", out)

    def _finish_dns(self, out: list[Output]) -> None:
        if self.mode == "dns":
            self.replay._dns_flush(self, out, None)


class _UdpFlow(_Flow):
    """A UDP flow carrying DNS."""

    __slots__ = ("dns_pending",)

    def __init__(self, replay: Replay, pkt: Packet, from_client: bool) -> None:
        super().__init__(replay, pkt, from_client, "udp")
        self.service = "dns"
        self.dns_pending: dict[int, tuple[int, str, int, int]] = {}


# ---------------------------------------------------------------------------
# The driver


def _host_of(target: bytes, headers: list[tuple[bytes, bytes]]) -> str | None:
    from rules.target import host_of

    return host_of(target, headers)


class Replay:
    """Packets in capture order → ``Decision``s (and ``ConnSummary``s when asked)."""

    def __init__(self, engine: Engine, *, limits: ReplayLimits | None = None, want_conns: bool = False,
                 shard: tuple[int, int] = (0, 1), order_marks: bool = False, flow_ids: bool = True) -> None:
        self.engine = engine
        self.limits = limits or ReplayLimits()
        self.want_conns = want_conns
        """Also emit a ``ConnSummary`` when each connection/flow ends (for the store)."""
        self.shard, self.shards = shard
        """This replay handles the flows whose ``(sport + dport) % shard[1]`` is
        ``shard[0]`` (parallel replay: one process per shard, each reading the
        whole capture). DNS answers of other shards are still read for ``dns_name``."""
        self.flow_ids = flow_ids
        """Give each flow its ``uid`` and Community ID (records carry them; JSON lines
        do not, and two SHA-1 digests a flow are a few percent of a replay's time)."""
        self.order_marks = order_marks
        """Put an ``OrderMark`` before the outputs of each flow closed by a sweep or
        by ``finish()`` (see "Output order" in the module docstring)."""
        self._max_flows = max(1, self.limits.max_flows // self.shards)
        """Each of n shards keeps 1/n of the flow cap: the processes together stay
        within ``max_flows``."""
        self._number = 0
        """Packets given to ``packet()`` so far, every shard's included."""
        self.stats = ReplayStats()
        self._tcp: dict[tuple[bytes, int, bytes, int], _TcpConn] = {}
        self._udp: dict[tuple[bytes, int, bytes, int], _UdpFlow] = {}
        # Flows by last activity, oldest first (moved to the end on each packet), so
        # idle timeouts and eviction look only at the oldest: O(1) per packet, not a
        # scan of the whole table.
        self._tcp_active: OrderedDict[_TcpConn, None] = OrderedDict()
        self._udp_active: OrderedDict[_UdpFlow, None] = OrderedDict()
        self._time_wait: OrderedDict[_TcpConn, None] = OrderedDict()
        """Closed connections, in closing order, kept ``time_wait_us``."""
        self._dns_deadlines: deque[tuple[int, int, _Flow, int, int]] = deque()
        """(replay clock, packet number, flow, id, index) of DNS queries, in capture
        order: unanswered ones are decided ``dns_answer_us`` later."""
        self._now = 0
        self._next_sweep = 0
        self.resolved: dict[tuple[str, str], str] = {}
        """(client ip, answered address) → the name it was resolved from (latest wins)."""

    # -- packets -----------------------------------------------------------

    def packet(self, pkt: Packet) -> list[Output]:
        """One decoded packet; returns what it completed."""
        out: list[Output] = []
        self._number += 1
        ts = pkt.ts
        if ts > self._now:
            # The clock and the sweeps follow every packet, other shards' included,
            # so that every shard sweeps at the same packets as a single replay does.
            self._now = ts
            if ts >= self._next_sweep:
                if self._next_sweep:
                    self._sweep(out)
                    if out and self.order_marks:
                        out.append(_PACKET_MARK)
                self._next_sweep = ts + self.limits.sweep_every_us
        if self.shards > 1 and (pkt.sport + pkt.dport) % self.shards != self.shard:
            if self.want_conns and pkt.proto == 17 and pkt.sport == DNS_PORT:
                self._remember_only(pkt)
            return out
        stats = self.stats
        stats.packets += 1
        stats.payload_bytes += len(pkt.payload)
        if pkt.proto == 6:
            self._tcp_packet(pkt, out)
        elif pkt.sport == DNS_PORT or pkt.dport == DNS_PORT:
            self._udp_packet(pkt, out)
        return out

    def finish(self) -> list[Output]:
        """End of input: close every open flow (deciding what it still holds)."""
        out: list[Output] = []
        for conn in list(self._tcp_active):
            self._mark(out, PHASE_END_TCP, conn.order)
            self._drop_tcp(conn, out, "end of capture")
        for conn in list(self._time_wait):
            self._drop_tcp(conn, out, "end of capture")  # closed already: nothing to output, no mark
        for flow in list(self._udp_active):
            self._mark(out, PHASE_END_UDP, flow.order)
            self._drop_udp(flow, out, "end of capture")
        self._dns_deadlines.clear()
        return out

    def _mark(self, out: list[Output], phase: int, order: int, sub: int = 0) -> None:
        if self.order_marks:
            out.append(OrderMark(phase, order, sub))

    def run(self, packets: Iterable[Packet]) -> Iterator[Output]:
        """Every output of ``packets`` followed by ``finish()``."""
        for pkt in packets:
            yield from self.packet(pkt)
        yield from self.finish()

    def _touch(self, flow: _Flow, active: OrderedDict[Any, None]) -> None:
        """A known flow had a packet: it is the most recently active (idle sweeps, order)."""
        flow.seen = self._now
        flow.order = self._number
        active.move_to_end(flow)

    def _tcp_packet(self, pkt: Packet, out: list[Output]) -> None:
        conn = self._tcp.get((pkt.src, pkt.sport, pkt.dst, pkt.dport))
        flags = pkt.flags
        if conn is not None and not conn.closed and not pkt.payload and not flags & (TH_SYN | TH_FIN | TH_RST):
            # A bare ACK (a third of the packets of a typical capture) only keeps its
            # connection alive: the same bookkeeping as below, without the detour.
            conn.last_ts = pkt.ts
            self._touch(conn, self._tcp_active)
            return
        if conn is not None and flags & TH_SYN and not flags & TH_ACK and (conn.closed or conn.fin_or_rst):
            # The 4-tuple is reused by a new connection (RFC 9293 §3.10.7.4, TIME-WAIT reuse).
            self._drop_tcp(conn, out, conn.reason)
            conn = None
        if conn is not None and conn.closed:
            # TIME-WAIT: late retransmissions and the last ACK of a closed connection
            # belong to it, not to a new one picked up mid-stream.
            self.stats.late_packets += 1
            return
        if conn is None:
            if not pkt.payload and not flags & TH_SYN:
                return  # a bare ACK/FIN/RST of a connection we never saw: nothing to decide
            from_client = self._tcp_client_side(pkt)
            conn = _TcpConn(self, pkt, from_client)
            self._add(self._tcp, pkt, conn, out)
            self.stats.tcp_flows += 1
        else:
            self._touch(conn, self._tcp_active)
        conn.packet(pkt, pkt.sport == conn.cport and pkt.src == conn.client_addr, out)
        if conn.closed:
            del self._tcp_active[conn]
            self._time_wait[conn] = None

    @staticmethod
    def _tcp_client_side(pkt: Packet) -> bool:
        """Is the sender of this first packet of a connection the client?"""
        flags = pkt.flags
        if flags & TH_SYN:
            return not flags & TH_ACK  # SYN: client; SYN-ACK: server
        # Picked up mid-connection: the well-known (or lower, privileged) port is the server's.
        if pkt.dport in _SERVER_PORTS or pkt.sport in _SERVER_PORTS:
            return pkt.dport in _SERVER_PORTS
        if (pkt.dport < 1024) != (pkt.sport < 1024):
            return pkt.dport < 1024
        return True

    def _udp_packet(self, pkt: Packet, out: list[Output]) -> None:
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        flow = self._udp.get(key)
        if flow is None:
            from_client = pkt.dport == DNS_PORT if pkt.sport != pkt.dport else True
            flow = _UdpFlow(self, pkt, from_client)
            self._add(self._udp, pkt, flow, out)
            self.stats.udp_flows += 1
        else:
            self._touch(flow, self._udp_active)
        from_client = pkt.sport == flow.cport and pkt.src == flow.client_addr
        flow.last_ts = pkt.ts
        if from_client:
            flow.bytes_up += len(pkt.payload)
        else:
            flow.bytes_down += len(pkt.payload)
        self._dns_message(flow, pkt.payload, pkt.ts, from_client, "udp", out)

    def _add(self, table: dict[Any, Any], pkt: Packet, flow: _Flow, out: list[Output]) -> None:
        if len(self._tcp_active) + len(self._udp_active) + len(self._time_wait) >= self._max_flows:
            self._evict(out)
        flow.keys = ((pkt.src, pkt.sport, pkt.dst, pkt.dport), (pkt.dst, pkt.dport, pkt.src, pkt.sport))
        for key in flow.keys:
            table[key] = flow
        if isinstance(flow, _TcpConn):
            self._tcp_active[flow] = None
        else:
            self._udp_active[flow] = None

    @staticmethod
    def _forget(table: dict[Any, Any], flow: _Flow) -> None:
        for key in flow.keys:
            if table.get(key) is flow:
                del table[key]

    def _drop_tcp(self, conn: _TcpConn, out: list[Output], reason: str) -> None:
        conn._close(out, reason)
        self._tcp_active.pop(conn, None)
        self._time_wait.pop(conn, None)
        self._forget(self._tcp, conn)

    def _drop_udp(self, flow: _UdpFlow, out: list[Output], reason: str) -> None:
        self._dns_flush(flow, out, None)
        flow.closed = True
        self._udp_active.pop(flow, None)
        self._forget(self._udp, flow)
        if self.want_conns:
            out.append(flow.summary(reason))

    def _sweep(self, out: list[Output]) -> None:
        """Close idle flows and decide unanswered DNS queries (replay clock); only
        the oldest entries of each ordered table are looked at."""
        now, lim = self._now, self.limits
        while self._time_wait:
            conn = next(iter(self._time_wait))
            if now - conn.seen <= lim.time_wait_us:
                break
            self._drop_tcp(conn, out, conn.reason)  # closed already: nothing to output, no mark
        while self._tcp_active:
            conn = next(iter(self._tcp_active))
            if now - conn.seen <= lim.tcp_idle_us:
                break
            self._mark(out, PHASE_SWEEP_TCP, conn.order)
            self._drop_tcp(conn, out, "timeout")
        while self._udp_active:
            flow = next(iter(self._udp_active))
            if now - flow.seen <= lim.udp_idle_us:
                break
            self._mark(out, PHASE_SWEEP_UDP, flow.order)
            self._drop_udp(flow, out, "timeout")
        deadlines = self._dns_deadlines
        while deadlines and now - deadlines[0][0] > lim.dns_answer_us:
            _, number, owner, dns_id, index = deadlines.popleft()
            pending = owner.dns_pending  # type: ignore[attr-defined]
            if not owner.closed and dns_id in pending and pending[dns_id][3] == index:
                self._mark(out, PHASE_SWEEP_DNS, number, index)
                self._dns_unanswered(owner, dns_id, out)

    def _evict(self, out: list[Output]) -> None:
        """The flow table is full: close the least recently active tenth
        (closed connections in TIME-WAIT first: they hold nothing undecided)."""
        total = len(self._tcp_active) + len(self._udp_active) + len(self._time_wait)
        for _ in range(max(1, total // 10)):
            if self._time_wait:
                conn = next(iter(self._time_wait))
                self._drop_tcp(conn, out, conn.reason)
                continue
            tcp = next(iter(self._tcp_active), None)
            udp = next(iter(self._udp_active), None)
            if tcp is None and udp is None:
                return
            self.stats.evicted_flows += 1
            if udp is None or (tcp is not None and tcp.order <= udp.order):
                self._drop_tcp(tcp, out, "evicted")  # type: ignore[arg-type]
            else:
                self._drop_udp(udp, out, "evicted")

    # -- DNS ---------------------------------------------------------------

    def _dns_message(self, flow: _Flow, data: bytes, ts: int, from_client: bool, transport: str,
                     out: list[Output]) -> None:
        """One DNS message (``read_common_dns`` or dnslib parses; malformed ones are
        counted and skipped)."""
        # Records need every answer's text (dnslib's): only JSON lines take the fast path.
        common = None if self.want_conns else read_common_dns(data)
        if common is not None:
            dns_id, is_response, rcode, qname, qtype, cnames = common
            answers: list[Any] = []
            answer_text: tuple[str, ...] = ()
        else:
            try:
                msg = dnslib.DNSRecord.parse(data)
                q = msg.questions[0]
                qname = _qname_text(q.qname)
                qtype = int(q.qtype)
                dns_id = int(msg.header.id)
                is_response = bool(msg.header.qr)
                answers = msg.rr if is_response else []
                rcode = int(msg.header.rcode) if is_response else None
                cnames = [_qname_text(rr.rdata.label) for rr in answers if rr.rtype == dnslib.QTYPE.CNAME]
                # Answers' text is for records only (the JSON line does not carry it).
                answer_text = tuple(str(rr.rdata) for rr in answers) if self.want_conns else ()
            except Exception:
                # Malformed (pointer loops, truncation, bad labels...): dnslib raises
                # DNSError, but also IndexError/struct.error/UnicodeError on some inputs.
                self.stats.dns_malformed += 1
                return
        pending: dict[int, tuple[int, str, int, int]] = flow.dns_pending  # type: ignore[attr-defined]
        if not is_response:
            if len(pending) >= self.limits.max_dns_pending:
                self._dns_flush(flow, out, None)
            if dns_id in pending:  # the same id again: a retry; the first one stands
                return
            pending[dns_id] = (ts, qname, qtype, flow.index)
            self._dns_deadlines.append((self._now, self._number, flow, dns_id, flow.index))
            flow.index += 1
            return
        if rcode == 0 and answers and self.want_conns:
            self._remember(flow.cip, qname, answers)
        query = pending.pop(dns_id, None)
        if query is None:
            qts, index = ts, flow.index
            flow.index += 1
        else:
            qts, qname, qtype, index = query
        engine = self.engine
        verdicts = [engine.dns(qname, qtype)]
        if cnames:
            verdicts.append(engine.dns_chain(cnames))
        out.append(flow.decision("dns", qts, verdicts, index=index, qname=qname, qtype=qtype, dns_id=dns_id,
                                 rcode=rcode, answers=answer_text, transport=transport))

    def _remember_only(self, pkt: Packet) -> None:
        """A DNS answer of another shard: only its name → address pairs are kept."""
        try:
            msg = dnslib.DNSRecord.parse(pkt.payload)
            if msg.header.rcode == 0 and msg.rr:
                self._remember(ip_text(pkt.dst), _qname_text(msg.questions[0].qname), msg.rr)
        except Exception:
            return  # malformed: the shard that owns the flow counts it

    def _remember(self, client_ip: str, qname: str, answers: list[Any]) -> None:
        resolved = self.resolved
        for rr in answers:
            if rr.rtype in (1, 28):  # A, AAAA
                key = (client_ip, str(rr.rdata))
                resolved.pop(key, None)
                resolved[key] = qname
        if len(resolved) > self.limits.max_resolved:
            for key in list(resolved)[: len(resolved) // 2]:
                del resolved[key]

    def _dns_flush(self, flow: _Flow, out: list[Output], older_than: int | None) -> None:
        """Decide queries that got no answer (all, or those asked before ``older_than``)."""
        pending: dict[int, tuple[int, str, int, int]] = flow.dns_pending  # type: ignore[attr-defined]
        for dns_id, (qts, _, _, _) in sorted(pending.items(), key=lambda kv: kv[1][3]):
            if older_than is None or qts < older_than:
                self._dns_unanswered(flow, dns_id, out)

    def _dns_unanswered(self, flow: _Flow, dns_id: int, out: list[Output]) -> None:
        pending: dict[int, tuple[int, str, int, int]] = flow.dns_pending  # type: ignore[attr-defined]
        qts, qname, qtype, index = pending.pop(dns_id)
        out.append(flow.decision("dns", qts, [self.engine.dns(qname, qtype)], index=index, qname=qname,
                                 qtype=qtype, dns_id=dns_id, transport=flow.proto))


_SERVER_PORTS = frozenset({80, 443, 53, 8080, 8000, 8443, 3128})


def read_common_dns(data: bytes) -> tuple[int, bool, int | None, str, int, list[str]] | None:
    """``(id, is_response, rcode, qname, qtype, cnames)`` of a DNS message of the
    common shape, read without building objects; None for anything else.

    The common shape: one question whose name is plain labels of printable ASCII
    (no ``.`` or ``\\`` inside a label), answers of type A (4 bytes), AAAA (16)
    or CNAME (a name filling its rdata exactly), no authority records, at most one
    additional record, the EDNS0 OPT (RFC 6891 6.1.2) of the root, and nothing
    after the last record. Every such message is one dnslib reads without error
    and to the same fields (``tests/proxy/test_replay.py`` checks both on
    generated and mutated messages), so dnslib alone still decides what is
    malformed: whatever is not of this shape goes to it. dnslib builds a dozen
    objects per message; this costs a few microseconds.
    """
    n = len(data)
    if n < 17:
        return None
    dns_id, flags, qd, an, ns, ar = _DNS_HEADER(data, 0)
    if qd != 1 or ns or ar > 1:
        return None
    pos = 12
    while True:
        ln = data[pos]
        if not ln:
            break
        if ln > MAX_LABEL:  # a pointer or a reserved label type
            return None
        pos += 1 + ln
        if pos >= n:
            return None
    qname = wire_name_text(data, 12, pos)
    if "\\" in qname:  # an octet that needed an escape: dnslib's text differs
        return None
    if pos + 5 > n:
        return None
    qtype = (data[pos + 1] << 8) | data[pos + 2]
    pos += 5
    cnames: list[str] = []
    for _ in range(an):
        if pos + 1 < n and data[pos] == 0xC0 and data[pos + 1] == 12:
            pos += 2  # the usual owner: a pointer to the question's name, read above
        else:
            try:
                owner, pos = read_name(data, pos)
            except FormatError:
                return None
            if "\\" in owner:
                return None
        if pos + 10 > n:
            return None
        rtype, _, _, rdlen = _RR_FIXED(data, pos)
        pos += 10
        end = pos + rdlen
        if end > n:
            return None
        if rtype == T_CNAME:
            try:
                target, after = read_name(data, pos)
            except FormatError:
                return None
            if after != end or "\\" in target:
                return None
            cnames.append(target)
        elif not (rtype == T_A and rdlen == 4 or rtype == T_AAAA and rdlen == 16):
            return None
        pos = end
    if ar:
        if pos + 11 > n or data[pos]:
            return None
        rtype, _, _, rdlen = _RR_FIXED(data, pos + 1)
        pos += 11
        end = pos + rdlen
        if rtype != T_OPT or end > n:
            return None
        # dnslib reads options while more than 4 bytes remain; each must fit.
        p = pos
        while end - p > 4:
            p += 4 + ((data[p + 2] << 8) | data[p + 3])
            if p > end:
                return None
        pos = end
    if pos != n:
        return None
    is_response = bool(flags & 0x8000)
    return dns_id, is_response, flags & 0xF if is_response else None, qname, qtype, cnames if is_response else []


def _qname_text(label: Any) -> str:
    """A DNS name as sent (case kept), without the root's trailing dot. Bytes
    outside ASCII are read as UTF-8 (some resolvers pass raw UTF-8 labels)."""
    return ".".join(part.decode("utf-8", "backslashreplace") for part in label.label)


# ---------------------------------------------------------------------------
# Records for the audit store (``replay --store``)


def to_record(output: Output) -> Any:
    """A ``Decision`` or ``ConnSummary`` as the storage record of its kind
    (storage/records.py), stamped with capture time."""
    from storage.records import Conn, Dns, Http, Tls

    if isinstance(output, ConnSummary):
        return Conn(
            ts=output.ts, uid=output.uid, client_ip=output.client_ip, client_port=output.client_port,
            client_mac=output.client_mac, server_ip=output.server_ip, server_port=output.server_port,
            action=output.action, rule_ids=list(output.rule_ids), ruleset_version=output.ruleset_version,
            community_id=output.community_id, proto=output.proto, service=output.service, ts_end=output.ts_end,
            bytes_up=output.bytes_up, bytes_down=output.bytes_down, close_reason=output.close_reason,
            dns_name=output.dns_name,
        )
    d = output
    common: dict[str, Any] = dict(
        ts=d.ts, uid=d.uid, client_ip=d.client_ip, client_port=d.client_port, client_mac=d.client_mac,
        server_ip=d.server_ip, server_port=d.server_port, action=d.action, rule_ids=[m.rule_id for m in d.matches],
        ruleset_version=d.ruleset_version, community_id=d.community_id,
    )
    if d.kind == "http":
        first = d.matches[0] if d.matches else None
        return Http(
            **common, method=d.method, host=d.host, url=d.url, status=d.status, content_type=d.content_type,
            req_bytes=d.req_bytes, resp_bytes=d.resp_bytes, user_agent=d.user_agent, referrer=d.referrer,
            category=first.category if first else None, keyword=first.pattern if first else None,
            snippet=first.snippet if first else None,
        )
    if d.kind == "tls":
        return Tls(**common, sni=d.sni, alpn=list(d.alpn), tls_version=d.tls_version, intercepted=False)
    return Dns(
        **common, qname=d.qname, qtype=d.qtype, qtype_name=qtype_name(d.qtype), rcode=d.rcode,
        rcode_name=_rcode_name(d.rcode), answers=list(d.answers), dns_id=d.dns_id, transport=d.transport,
    )


def _rcode_name(rcode: int | None) -> str | None:
    if rcode is None:
        return None
    name = dnslib.RCODE.get(rcode)
    return name if isinstance(name, str) and not name.isdigit() else f"RCODE{rcode}"
