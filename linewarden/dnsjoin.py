"""The dns_name join: which name a client resolved to the server address it connects to.

DESIGN.md "Records": a conn record carries ``dns_name``, the name this client last
resolved to that server address through the shim. The DNS shim and the HTTP(S)
proxy run in different worker processes (linewarden/workers.py), so neither can
see the other's state. Every record of every worker passes through the main
process on its way to the one store writer: that is where the join happens.

Strategy:

* ``DnsJoin`` (sans-IO: time is an argument, STYLE.md 2) keeps a bounded table
  (client ip, answered address) → (qname, expiry), filled from ``Dns`` records:
  every A/AAAA answer address of an A or AAAA query. The name kept is the
  qname the client asked, not the CNAME target that carried the address: a dns
  record's ``answers`` hold the whole answer section (CNAME targets, then the
  addresses at the end of the chain), and all of it answers the question, so
  following the chain back always ends at ``qname``. Blocked names answered
  with the sinkhole address are learnt too (the block page's connection then
  names what was blocked).
* A ``Conn`` record without ``dns_name`` gets the entry for
  (client_ip, server_ip) when the connection started (``ts``) before the entry
  expired. The lookup happens when the record passes, at the connection's end;
  a client that re-resolved the address meanwhile gives its latest name (for a
  long connection that is nearly always the same name). Http and Tls records are left as they are: they carry ``host`` and
  ``sni``, and the schema has no ``dns_name`` for them.
* The race: the Dns record of a resolution always precedes the connection that
  uses it, but it travels over another worker's channel (batched up to
  ``CHANNEL_FLUSH_S``, queued behind that channel's backlog). Conn records are
  sent when the connection closes, so for all but the shortest connections the
  Dns record is long in the table. A Conn record that finds no name while it
  is younger than ``JOIN_HOLD_S`` (counted from its start, ``ts``) is held
  until then and looked up again; then it goes to the writer named or not.
  Only unnamed short connections wait, and only the remainder of the window;
  the data path never waits (records are written after the connection ended).

Explicit proxy mode: the client asks the proxy for a host name and the proxy
resolves it itself (getaddrinfo, not the shim). ``dns_name`` keeps the meaning
the schema gives it: the name *this client* resolved through the shim to the
address the proxy connected to. It is therefore set only when the client also
asked the shim for it (a client that resolves, then asks the proxy for the
address), and stays empty for plain by-name explicit requests, whose name is
in the http record's ``host`` or the CONNECT target instead. Transparent mode
(the gateway case) is the one the join is for: there the client always
resolves first and connects to the address it got.

Must not: read the clock or touch the event loop (only ``JoinSink``, the small
asyncio adapter at the bottom, does), parse DNS, or write SQL.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable
from typing import Any

import msgspec

from storage.records import Conn, Dns, Record
from storage.schema import Copies, latest_of

US = 1_000_000

JOIN_MAX_ENTRIES = 65_536
"""(client, address) pairs remembered. Past it the least recently resolved quarter is
forgotten at once (one O(n) sweep per n/4 answers: amortised O(1), and cheaper per
query than an LRU's bookkeeping on this path, which every DNS answer takes).
A gateway for a few hundred clients, each resolving a few hundred distinct
addresses an hour, fits; one entry costs ~250 bytes, so the table stays under
~16 MB whatever the traffic (a client resolving random names cannot grow it)."""
JOIN_MAX_AGE_S = 3600
"""The cap on an answer's lifetime in the table: a connection started more than
this after the resolution gets no name from it. The dns record carries no TTL
(the storage schema keeps ``answers`` as text), so every entry gets this cap;
``DnsJoin.learn`` takes the answer's TTL when a caller has it (capped here)."""
JOIN_MIN_AGE_S = 60
"""Floor on an entry's lifetime when a TTL is given: clients keep answers past
tiny TTLs (Chrome's host cache holds every answer for 60 s, Java for 30 s), and
a connection they open meanwhile is still one to the name they resolved."""
JOIN_HOLD_S = 1.0
"""How long after its start an unnamed Conn record may wait for the Dns record
of its resolution to arrive over another channel. Covers a worker's
``CHANNEL_FLUSH_S`` (20 ms) with a wide margin for a busy main process; the
cost is only that short, unnamed connections reach the store up to this late."""
JOIN_HOLD_MAX = 50_000
"""Conn records held at once. Past it the oldest held one goes to the writer
unnamed at once: memory stays bounded (~25 MB) under a flood of short
connections to unresolved addresses."""

RELEASE_GRAIN_S = 0.05
"""Least delay of the release timer: held records whose wait ends within it go
together (at hundreds of connections a second, one timer per record otherwise)."""

LEARN_DELAY_S = 0.05
"""How long the DNS hit path's copies may wait to be learnt (``JoinSink.submit_copies``):
at 100k hits a second over a thousand names, one learn per name per window instead of
one per hit. Nothing reads the table in between without learning them first."""

_ADDR_QTYPES = frozenset((1, 28))  # A, AAAA


class DnsJoin:
    """The (client ip, address) → name table and the Conn records waiting for it."""

    def __init__(self, max_entries: int = JOIN_MAX_ENTRIES, hold_s: float = JOIN_HOLD_S,
                 hold_max: int = JOIN_HOLD_MAX) -> None:
        self.max_entries = max_entries
        self.hold_us = int(hold_s * US)
        self.hold_max = hold_max
        self.table: dict[tuple[str, str], tuple[str, int]] = {}
        """(client ip, address) → (qname, expiry µs), in order of resolution (latest last)."""
        self.held: collections.deque[tuple[int, Conn]] = collections.deque()
        """(release time µs, record) of Conn records waiting for their Dns record."""
        self.named = 0
        """Conn records that got a name."""
        self.unnamed = 0
        """Conn records that went on without one."""

    # -- the table ----------------------------------------------------------------

    def learn(self, client_ip: str, qname: str, answers: list[str], ts: int,
              ttl_s: int | None = None) -> None:
        """``client_ip`` asked ``qname`` at ``ts`` (µs) and got ``answers`` (text)."""
        if ttl_s is None:
            life = JOIN_MAX_AGE_S
        else:
            life = min(max(ttl_s, JOIN_MIN_AGE_S), JOIN_MAX_AGE_S)
        value = (qname[:-1] if qname.endswith(".") else qname, ts + life * US)
        table = self.table
        for a in answers:
            # An address, not a CNAME target: an AAAA address has a colon (a name never
            # does); an A address ends with a digit where a name ends with its top-level
            # label, never all-numeric (RFC 3696 section 2). Inline: runs for every query.
            if ":" in a or a[-1:].isdigit():
                key = (client_ip, a)
                table.pop(key, None)  # re-inserted last: the newest resolution
                table[key] = value
        if len(table) > self.max_entries:
            for key in list(itertools.islice(table, len(table) - self.max_entries * 3 // 4)):
                del table[key]

    def name_for(self, client_ip: str, server_ip: str, ts: int) -> str | None:
        """The name ``client_ip`` last resolved to ``server_ip``, if still valid at ``ts`` (µs)."""
        entry = self.table.get((client_ip, server_ip))
        if entry is None or ts > entry[1]:
            return None
        return entry[0]

    # -- records ------------------------------------------------------------------

    def feed(self, record: Record, now: int) -> Record | None:
        """One record on its way to the writer, at wall time ``now`` (µs).

        Returns the record to submit (a Conn possibly with ``dns_name`` set), or
        None when a Conn is held; held records come back from ``release``. When
        ``hold_max`` are held, holding one more returns the oldest held one."""
        kind = type(record)
        if kind is Dns:
            r: Any = record
            if r.qtype in _ADDR_QTYPES and r.answers and r.client_ip and r.qname:
                self.learn(r.client_ip, r.qname, r.answers, r.ts)
            return record
        if kind is not Conn:
            return record
        c: Any = record
        if c.dns_name is not None or not c.server_ip or not c.client_ip:
            return record
        named = self._name(c)
        if named is not None:
            return named
        due = c.ts + self.hold_us
        if due <= now:
            self.unnamed += 1
            return record
        held = self.held
        held.append((due, c))
        if len(held) > self.hold_max:
            return self._final(held.popleft()[1])  # full: the oldest goes on now
        return None

    def release(self, now: int) -> list[Record]:
        """Held records whose wait is over, named if they can be."""
        held = self.held
        out: list[Record] = []
        while held and held[0][0] <= now:
            out.append(self._final(held.popleft()[1]))
        return out

    def drain(self) -> list[Record]:
        """Every held record, now (shutdown, ``flush``)."""
        out = [self._final(c) for _, c in self.held]
        self.held.clear()
        return out

    def next_release(self) -> int | None:
        """When ``release`` next has something to return (µs), or None."""
        return self.held[0][0] if self.held else None

    def _name(self, c: Conn) -> Conn | None:
        name = self.name_for(c.client_ip, c.server_ip, c.ts)  # type: ignore[arg-type]
        if name is None:
            return None
        self.named += 1
        return msgspec.structs.replace(c, dns_name=name)

    def _final(self, c: Conn) -> Conn:
        named = self._name(c)
        if named is None:
            self.unnamed += 1
            return c
        return named


class JoinSink:
    """The asyncio adapter: a record sink in front of the writer that runs ``DnsJoin``.

    ``submit`` is the writer's ``submit`` (never awaits); a held Conn counts as
    accepted (its connection is over: there is nothing left to refuse). The
    only code here that reads the clock or the loop. Everything else of the
    writer (``start``, ``committed``, ``stats``...) is the writer's own;
    ``flush`` and ``close`` first hand over the held records."""

    def __init__(self, writer: Any, join: DnsJoin | None = None,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1000) -> None:
        self.writer = writer
        self.join = join or DnsJoin()
        self.clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._unlearnt: dict[int, tuple[Any, ...]] = {}
        """id(prototype) -> its latest hit-path copy not learnt yet, in the order of the
        latest copies (``submit_copies``)."""
        self._learn_timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)

    def submit(self, record: Record) -> bool:
        kind = type(record)
        if kind is Dns:
            # Inline for the common case (every DNS query passes here): learn, pass on.
            r: Any = record
            if r.answers and r.qtype in _ADDR_QTYPES and r.client_ip and r.qname:
                if self._unlearnt:
                    self._learn_copies()
                self.join.learn(r.client_ip, r.qname, r.answers, r.ts)
            return self.writer.submit(record)  # type: ignore[no-any-return]
        if kind is not Conn:
            return self.writer.submit(record)  # type: ignore[no-any-return]
        if self._unlearnt:
            self._learn_copies()
        out = self.join.feed(record, self.clock())
        if self._timer is None and self.join.held:
            self._arm()
        if out is None:
            return True
        return self.writer.submit(out)  # type: ignore[no-any-return]

    def submit_copies(self, copies: Copies) -> bool:
        """The DNS hit path's records, learnt once per prototype within ``LEARN_DELAY_S``:
        its latest copy, in the order of the latest copies, so the table ends as if each
        had been learnt in turn. Whatever reads or changes the table (a Conn, a record
        of the Python path, a release) first learns what is pending."""
        latest = self._unlearnt
        latest_of(copies, latest)
        if latest and self._learn_timer is None:
            self._learn_timer = asyncio.get_running_loop().call_later(LEARN_DELAY_S, self._learn_copies)
        return self.writer.submit_copies(copies)  # type: ignore[no-any-return]

    def _learn_copies(self) -> None:
        if self._learn_timer is not None:
            self._learn_timer.cancel()
            self._learn_timer = None
        latest, self._unlearnt = self._unlearnt, {}
        learn = self.join.learn
        for e in latest.values():
            r = e[0]
            if r.answers and r.qtype in _ADDR_QTYPES and r.client_ip and r.qname:
                learn(r.client_ip, r.qname, r.answers, e[2])

    def _arm(self) -> None:
        due = self.join.next_release()
        if due is None:
            return
        delay = max(RELEASE_GRAIN_S, (due - self.clock()) / US)
        self._timer = asyncio.get_running_loop().call_later(delay, self._release)

    def _release(self) -> None:
        self._timer = None
        self._learn_copies()
        for r in self.join.release(self.clock()):
            self.writer.submit(r)
        self._arm()

    def _drain(self) -> None:
        self._learn_copies()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for r in self.join.drain():
            self.writer.submit(r)

    async def flush(self) -> None:
        self._drain()
        await self.writer.flush()

    async def close(self) -> None:
        self._drain()
        await self.writer.close()
