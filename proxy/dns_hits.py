"""The DNS shim's hit path: repeated questions answered and recorded without per-query Python.

Owns: the answer table that the compiled loop (``proxy._dnshits``, C) serves from,
the record templates behind it, and the fixed-size hit records it leaves
(``HIT_RECORD``, laid out by ``storage/hits.py``, which reads them back).
Must not: decide anything. An answer enters the table only after the shim
answered that very question (same bytes but the id) from that very client the
full way, through the Engine, the cache and the record prototype memo of
``proxy/dns_shim.py``; it stays only while that answer cannot change but for
its TTLs, which the C loop ages as the cache does (until the cache entry
expires; ``BLOCK_VALID_S`` for a block), and a rule reload empties the table.

Why: issue 5 asks for cache hits at dnsmasq's and unbound's rate with every
query recorded. On a hit the Python path costs ~20 µs of CPU in the worker and
~3 µs more in the main process to decode its msgpack record; here a hit is a
dict lookup and a share of one ``recvmmsg`` and one ``sendmmsg``, and its
record crosses to the main process as 28 bytes. There it goes to the store, still
packed, as ``storage.schema.Copies`` (template + the same five per-query fields the
shim's memo replaces: ts, uid, client port, DNS id, latency), which the writer encodes
from the template's row: the store holds exactly the rows and chain bytes the
Python path's records would have given, for a fraction of the CPU.

Where it runs: in DNS worker processes (``dns.workers >= 1``, the default),
whose record sink is the channel to the main process (``ChannelSink``); with
``dns.workers = 0`` or without a C compiler at install the Python path alone
serves. ``LINEWARDEN_PURE_PYTHON=1`` turns it off.

Templates are numbered per worker; the number wraps at ``TEMPLATE_MAX``, and
before it wraps the table is emptied and the pending hit records sent, so a
hit record always names the template that was current when it was served.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, Protocol

from storage.records import Alarm, Dns
from storage.hits import HIT
from storage.schema import Copies

try:
    from proxy import _dnshits
except ImportError:  # built without a C compiler: the Python path serves alone
    _dnshits = None

ENABLED = _dnshits is not None and os.environ.get("LINEWARDEN_PURE_PYTHON", "") in ("", "0")

HIT_RECORD = HIT
"""ts (µs since the epoch), uid sequence number, template, client port, DNS id, latency µs."""
assert _dnshits is None or _dnshits.RECORD_SIZE == HIT_RECORD.size

TABLE_MAX = 65_536
"""Answers kept (one per client address and question shape); emptied when full."""
TEMPLATE_MAX = 65_536
"""Template numbers per worker before they wrap (the main process keeps this many)."""
BLOCK_VALID_S = 1.0
"""How long a block answer is served from the table before the shim is asked again
(blocks change only on reload, which empties the table; the refresh keeps the
shim's own counters and memo warm)."""

Template = tuple[str, Dns, Alarm | None]
"""(uid prefix, dns record prototype, alarm prototype or None)."""
Aging = tuple[float, tuple[int, ...], tuple[int, ...]]
"""(when the answer was stored, monotonic clock; its TTLs' offsets; the TTLs then)."""
TTL_AT = struct.Struct("<II")
"""(offset in the answer after its id, TTL when stored): the C loop's ageing table."""


class HitSink(Protocol):
    """Where hit records go: the worker's channel to the main process."""

    def template(self, tid: int, tmpl: Template) -> None:
        """Send ``tmpl`` as number ``tid``, after every hit record handed over before."""

    def hits(self, records: bytes) -> None: ...

    def accepting(self) -> bool: ...


def client_key(ip: str) -> bytes | None:
    """Family byte + packed address, as the C loop keys a datagram's source (None: not keyed)."""
    try:
        if ":" in ip:
            return b"\x06" + socket.inet_pton(socket.AF_INET6, ip)
        return b"\x04" + socket.inet_pton(socket.AF_INET, ip)
    except OSError:  # a scoped or odd address: the Python path serves it
        return None


def copies(records: bytes, templates: dict[int, Template]) -> Copies:
    """Hit records as the store takes them: each its template's prototypes + its own
    values, kept packed (storage/hits.py)."""
    return Copies.of_hits(records, templates)


class FastHits:
    """The worker side: the table, the template numbers, one ``serve`` per readable socket."""

    def __init__(self, sink: HitSink, prefix: str) -> None:
        self.sink = sink
        self.prefix = prefix
        self.table: dict[bytes, tuple[bytes, int, float]] = {}
        self.records = bytearray()
        self.next_tid = 0
        self.tids: dict[int, tuple[Dns, int]] = {}
        """id(prototype) -> (prototype, its template number), for the numbers in use."""
        self.anchor: object = None
        """The engine state the table's answers were decided under."""

    def template_of(self, proto: Dns, alarm: Alarm | None) -> int:
        """The number of a record prototype (and its alarm), sent to the sink the first time."""
        got = self.tids.get(id(proto))
        if got is not None and got[0] is proto:
            return got[1]
        if self.next_tid >= TEMPLATE_MAX:
            self.reset()
        tid = self.next_tid
        self.next_tid += 1
        self.tids[id(proto)] = (proto, tid)
        self.sink.template(tid, (self.prefix, proto, alarm))
        return tid

    def learn(self, ip: str, data: bytes, resp: bytes, proto: Dns, alarm: Alarm | None,
              until: float, aging: Aging | None = None) -> None:
        """Serve ``resp`` (for any id) to ``ip`` asking ``data`` (any id) until ``until``,
        recorded as copies of ``proto`` (and ``alarm``); with ``aging``, its TTLs drop
        as the cached answer's do (the C loop ages them as ``CachedWire.aged_body``)."""
        ck = client_key(ip)
        if ck is None or len(data) < 12 or resp[:2] != data[:2]:
            return
        if len(self.table) >= TABLE_MAX:
            self.table.clear()
        value: tuple[Any, ...] = (resp[2:], self.template_of(proto, alarm), until)
        if aging is not None:
            stored, offsets, ttls = aging
            if any(not 2 <= o <= len(resp) - 4 for o in offsets):
                return
            value += (stored, b"".join(TTL_AT.pack(o - 2, t) for o, t in zip(offsets, ttls)))
        self.table[ck + data[2:]] = value

    def reset(self) -> None:
        """Template numbers wrap: forget every answer and number, hand over the hit records
        held (the sink sends them ahead of the next template, ``HitSink.template``)."""
        self.table.clear()
        self.tids.clear()
        self.next_tid = 0
        self.flush()

    def serve(self, fd: int, seq: int, state: object, batch: int) -> tuple[list[tuple[bytes, Any]], int, int]:
        """One ``recvmmsg`` of up to ``batch`` datagrams (64 at most): hits answered here;
        returns (misses for the Python path, seq after, answers the socket refused)."""
        if state is not self.anchor:
            self.table.clear()
            self.anchor = state
        misses, seq, hits, unsent, _more = _dnshits.serve(fd, self.table, self.records, seq, batch)
        if hits:
            self.flush()
        return misses, seq, unsent

    def flush(self) -> None:
        if self.records:
            self.sink.hits(bytes(self.records))
            self.records.clear()


def usable(sink: Any) -> bool:
    """Whether a shim with this record sink can use the hit path."""
    return ENABLED and all(callable(getattr(sink, m, None)) for m in ("template", "hits", "accepting"))

