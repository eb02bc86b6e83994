"""The DNS shim's answer cache: TTL-bound, size-bound (LRU), negative caching.

Owns: which upstream answers are kept, for how long, and which are evicted.
Must not: parse packets (``proxy/dns_fastpath.py`` walks them once and hands
over a ``ResponseInfo``), read the clock (``now`` is an argument, STYLE.md 2),
or decide anything about blocking (verdicts are looked up per query, so a rule
reload never serves a stale decision from here).

Rules kept:
1. An entry lives for the smallest TTL of its answer RRset, clamped to
   ``[min_ttl, max_ttl]``; a TTL of 0 is not cached (RFC 1035 3.2.1: "zero
   values are interpreted to mean that the RR can only be used for the
   transaction in progress").
2. Negative answers (NXDOMAIN, and NOERROR with no answer = NODATA) live for
   min(SOA TTL, SOA MINIMUM) of the SOA in the authority section, capped by
   ``max_negative_ttl`` (RFC 2308 5). Without an SOA they are not cached
   (RFC 2308 5: "Negative responses without SOA records SHOULD NOT be cached").
3. SERVFAIL, REFUSED and truncated answers are never cached.
4. At most ``max_entries`` entries; the least recently used goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from proxy.dns_fastpath import NOERROR, NXDOMAIN, TC, CachedWire, ResponseInfo

DEFAULT_MAX_ENTRIES = 100_000
"""About 100k answers of ~100-500 bytes: tens of MB, the working set of a
unit with a few thousand users (unbound's default msg-cache is 4 MB, dnsmasq's
150 names; a gateway can afford more)."""
DEFAULT_MAX_TTL = 86_400
"""One day, as unbound's cache-max-ttl: a record that says "forever" is re-asked daily."""
DEFAULT_MAX_NEGATIVE_TTL = 900
"""RFC 2308 5 suggests 1-3 hours as a cap; 15 minutes lets a name that just
went live resolve soon (unbound's cache-max-negative-ttl is 3600)."""


@dataclass(slots=True)
class CacheEntry:
    """One cached answer."""

    wire: CachedWire
    """The stored response and its TTL offsets (rendered per client)."""
    expires: float
    """Clock value after which the entry is stale."""
    rcode: int
    answers: list[str]
    """Answer data as text, for the audit record of every hit."""
    cnames: tuple[str, ...]
    """CNAME targets, for the chain check on every hit."""
    chain: tuple[object, object] | None = None
    """(engine state, verdict) memo of the chain check; see ``EngineRef``."""

    @property
    def negative(self) -> bool:
        return self.rcode == NXDOMAIN or not self.answers


class DnsCache:
    """Bounded LRU of ``CacheEntry`` keyed by the fast path's question key."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        min_ttl: int = 0,
        max_ttl: int = DEFAULT_MAX_TTL,
        max_negative_ttl: int = DEFAULT_MAX_NEGATIVE_TTL,
    ) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._data: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= now:
            del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry

    def lifetime(self, info: ResponseInfo) -> int | None:
        """Seconds ``info`` may be cached, or None (rules 1-3)."""
        if info.flags & TC or info.ttl is None:
            return None
        if info.rcode not in (NOERROR, NXDOMAIN):
            return None
        positive = info.rcode == NOERROR and (info.body[6] or info.body[7])
        cap = self.max_ttl if positive else self.max_negative_ttl
        ttl = min(max(info.ttl, self.min_ttl), cap)
        return ttl if ttl > 0 else None

    def put(
        self, key: bytes, info: ResponseInfo, answers: list[str], now: float
    ) -> CacheEntry | None:
        """Store ``info`` under ``key`` when cacheable; returns the entry (or None)."""
        ttl = self.lifetime(info)
        if ttl is None or self.max_entries == 0:
            return None
        entry = CacheEntry(CachedWire(info, now, ttl), now + ttl, info.rcode, answers, tuple(info.cnames))
        self._data[key] = entry
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evictions += 1
        return entry

    def clear(self) -> None:
        self._data.clear()
