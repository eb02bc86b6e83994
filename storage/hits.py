"""The DNS hit path's records as the workers send them: packed hit records.

Owns: the hit record's layout (``HIT``) and the ``Copies`` entries it stands for
(``expand``), ``scan`` (which templates a frame names, how many records it stands
for, its ts span) and ``latest`` (the DNS join's latest copy per prototype), each
in C (``storage._copies``) where it is built and in Python here.
Must not: know sockets or DNS: a template is (uid prefix, prototype, companion),
whatever made it.

Why: the main process takes every cache hit the DNS workers answered, ~170,000 a
second in the benchmark. Made into one Python tuple each (seven objects) they cost
it about a fifth of its CPU before the store wrote a byte. A ``Copies`` keeps a
channel frame's bytes and the templates it names (``Copies.packed``) instead; the
writer groups and encodes its runs from those bytes in C
(``RowEncoder.encode_hit_run``), and the entries are made only where something
reads them (``Copies.entries``: the rows of a prototype that cannot be a run, a
batch across midnight, syslog).
"""

from __future__ import annotations

import struct
from typing import Any

HIT = struct.Struct("<qQIHHI")
"""ts (µs since the epoch), uid sequence number, template number, client port, DNS
id, latency µs; little-endian, 28 bytes (``proxy/_dnshits.c`` writes them)."""

Template = tuple[str, Any, Any]
"""(uid prefix, prototype, companion or None): an entry's uid is the prefix + its
sequence number in lower-case hex."""

Entry = tuple[Any, Any, int, str, int, int, int]
"""A ``Copies`` entry: (proto, companion, ts, uid, client_port, dns_id, latency_us)."""


def _check(records: bytes) -> None:
    if len(records) % HIT.size:
        raise ValueError("hit records are bytes, a multiple of 28 long")


def scan(records: bytes, templates: dict[int, Template]) -> tuple[dict[int, Template], int, int, int]:
    """(the templates ``records`` name, the records they stand for (a companion is one
    more), least ts, greatest ts (0, 0 for none)); KeyError for a number not in
    ``templates``. ``storage._copies.scan`` is the same in C."""
    _check(records)
    tmap: dict[int, Template] = {}
    count = lo = hi = 0
    for i, (ts, _seq, tid, _port, _dns_id, _latency) in enumerate(HIT.iter_unpack(records)):
        t = tmap.get(tid)
        if t is None:
            t = tmap[tid] = templates[tid]
        count += 1 if t[2] is None else 2
        lo = ts if i == 0 or ts < lo else lo
        hi = ts if i == 0 or ts > hi else hi
    return tmap, count, lo, hi


def expand(records: bytes, tmap: dict[int, Template]) -> list[Entry]:
    """The ``Copies`` entries of ``records``, in order (``storage._copies.expand`` in C)."""
    _check(records)
    out: list[Entry] = []
    append = out.append
    for ts, seq, tid, port, dns_id, latency in HIT.iter_unpack(records):
        prefix, proto, companion = tmap[tid]
        append((proto, companion, ts, f"{prefix}{seq:x}", port, dns_id, latency))
    return out


def latest(records: bytes, tmap: dict[int, Template], into: dict[int, tuple[Any, Any, int]]) -> None:
    """Each record's (proto, companion, ts) moved to the end of ``into`` under id(its
    prototype), in order: ``into`` then holds each prototype's latest copy, in the order
    of those latest copies, as ``schema.latest_copies`` leaves it for the entries (C:
    ``storage._copies.latest_hits``, which makes only the last record's)."""
    for ts, _seq, tid, _port, _dns_id, _latency in HIT.iter_unpack(records):
        _prefix, proto, companion = tmap[tid]
        k = id(proto)
        if k in into:
            del into[k]
        into[k] = (proto, companion, ts)


def entries_at(packs: list[tuple[bytes, dict[int, Template]]], at: bytes) -> list[Entry]:
    """The entries of a group of ``storage._copies.group_hits``: ``at`` holds its
    (pack, record) pairs as native unsigned ints."""
    made: dict[int, list[Entry]] = {}
    out = []
    pairs = struct.unpack(f"{len(at) // 4}I", at)
    for j, i in zip(pairs[::2], pairs[1::2]):
        es = made.get(j)
        if es is None:
            es = made[j] = expand(*packs[j])
        out.append(es[i])
    return out
