"""Runs: the copies of one prototype kept as one row of a day file.

The DNS shim's hit path hands the writer ``storage.schema.Copies``: records that differ
from a prototype only in ``ts``, ``uid``, ``client_port``, ``dns_id`` and ``latency_us``
(``schema.COPY_FIELDS``; a companion alarm only in the first three). Written as rows of
``rec``, each costs SQLite ~6 µs (18 columns, two index entries): more than all the rest
of the hit path together. So the writer keeps the copies of one prototype in one commit
as a run:

* ``protos``: the prototype's row (and its companion's), with the columns of ``rec``,
  once per day file;
* ``runs``: ``first_id``, the prototype's and companion's ids in ``protos``, ``count``,
  the least and greatest ``ts``; and ``run_data`` (by ``first_id``): ``data``, the
  msgpack array of each copy's ``[ts, uid, client_port, dns_id, latency_us]``, in
  ``ts`` order (written by ``RowEncoder.encode_run``, in C where ``storage._copies``
  is built). Apart, so that a query scans the lean ``runs`` for its prototypes.

Copy ``k`` of a run is the record with id ``first_id + k`` (``first_id + 2k`` and, for
its companion, ``+ 1`` when the run has one): runs and ``rec`` rows share one id
sequence and one hash chain, and the chain hashes each copy's logical bytes exactly as
if it were a row. Readers see records only: ``query`` merges runs into ``rec``'s order,
``verify`` recomputes the chain over both (a changed run or prototype changes the
copies' bytes, so it is found like a changed row).

Owns the ``data`` format and the expansion of runs. Must not open files or commit.
"""

from __future__ import annotations

import functools
import heapq
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from storage.schema import COMPANION_FIELDS, COPY_FIELDS, Layout, RowDecoder

_dec = msgspec.msgpack.Decoder()

Copy = list[Any]
"""(ts, uid, client_port, dns_id, latency_us): the values of ``COPY_FIELDS``."""
assert COPY_FIELDS == ("ts", "uid", "client_port", "dns_id", "latency_us")
assert COMPANION_FIELDS == COPY_FIELDS[:3]


def unpack(data: bytes) -> list[Copy]:
    """The copies of a run. Untyped: a value comes back as the type it was written as."""
    copies = _dec.decode(data)
    if type(copies) is not list or not all(type(c) is list and len(c) == 5 for c in copies):
        raise ValueError("run data is not a list of 5-value copies")
    return copies


RUN_SELECT = ("r.first_id, proto, companion, count, min_ts, max_ts, d.data "
              "FROM runs r LEFT JOIN run_data d ON d.first_id = r.first_id")
"""A run with its data (None where its data row is missing: it then fails to decode)."""


def has_runs(conn: sqlite3.Connection) -> bool:
    """Whether a day file has the tables (format 2 on; a format 1 file has no runs)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone() is not None


Values = tuple[Layout, dict[str, Any]]


class Runs:
    """The runs of one day file as records, through the file's ``RowDecoder``."""

    def __init__(self, conn: sqlite3.Connection, dec: RowDecoder) -> None:
        self.conn, self.dec = conn, dec
        self.present = has_runs(conn)
        self._protos: dict[int, Values] = {}

    def proto(self, pid: int) -> Values:
        got = self._protos.get(pid)
        if got is None:
            row = self.conn.execute("SELECT * FROM protos WHERE id = ?", (pid,)).fetchone()
            if row is None:
                raise ValueError(f"prototype {pid} missing from protos")
            got = self._protos[pid] = self.dec.values(row)
        return got

    def copies(self, run: tuple[Any, ...], only: frozenset[int] | None = None) -> Iterator[tuple[int, int, Values]]:
        """(ts, id, values) of each record of ``run`` (a ``runs`` row), in id order; with
        ``only``, just those whose prototype id is in it."""
        first, pid, cpid, count, _min_ts, _max_ts, data = run
        lay, base = self.proto(pid)
        comp = self.proto(cpid) if cpid is not None else None
        copies = unpack(data)
        if len(copies) != count:
            raise ValueError(f"run {first} holds {len(copies)} copies, not {count}")
        step = 1 if comp is None else 2
        want_main = only is None or pid in only
        want_comp = comp is not None and (only is None or cpid in only)
        for k, c in enumerate(copies):
            rid = first + k * step
            if want_main:
                yield c[0], rid, (lay, _copy_of(base, COPY_FIELDS, c))
            if want_comp:
                assert comp is not None
                yield c[0], rid + 1, (comp[0], _copy_of(comp[1], COMPANION_FIELDS, c))

    def by_id(self) -> Iterator[tuple[int, Callable[[], bytes]]]:
        """(id, its logical bytes when called) of every record of every run, in id order;
        a run that cannot be read yields its ids with a call that raises why."""
        if not self.present:
            return
        for run in self.conn.execute(f"SELECT {RUN_SELECT} ORDER BY r.first_id"):
            try:
                got = [(rid, RowDecoder.logical_of(lay, v)) for _ts, rid, (lay, v) in self.copies(run)]
            except Exception as exc:
                yield from _broken(run, exc)
                continue
            for rid, lg in got:
                yield rid, _const(lg)

    def in_time_order(self, where: str, args: list[Any], since: int | None, until: int | None) -> Iterator[tuple[int, int, Values]]:
        """(ts, id, values) of the run records whose prototype matches ``where`` (SQL on the
        columns of ``rec``, with no condition on ts or id), in (ts, id) order, within
        [since, until)."""
        if not self.present:
            return
        only = frozenset(r[0] for r in self.conn.execute(f"SELECT id FROM protos WHERE {where}", args))
        if not only:
            return
        lo = since if since is not None else -(2**63)
        hi = until if until is not None else 2**63 - 1
        marks = ",".join("?" * len(only)) if len(only) <= 500 else None
        cond = (f"(proto IN ({marks}) OR companion IN ({marks}))" if marks else
                f"(proto IN (SELECT id FROM protos WHERE {where}) OR companion IN (SELECT id FROM protos WHERE {where}))")
        cargs = [*only, *only] if marks else [*args, *args]
        runs = self.conn.execute(f"SELECT {RUN_SELECT} WHERE {cond} AND max_ts >= ? AND min_ts < ? "
                                 "ORDER BY min_ts, r.first_id", [*cargs, lo, hi])
        for ts, rid, vals in _merge(runs, lambda run: self.copies(run, only)):
            if lo <= ts < hi:
                yield ts, rid, vals


def _copy_of(base: dict[str, Any], fields: tuple[str, ...], values: Copy) -> dict[str, Any]:
    """A prototype's values with a copy's own; lists copied, so no two records share one."""
    v = {k: list(x) if type(x) is list else x for k, x in base.items()}
    v.update(zip(fields, values))
    return v


def by_id(conn: sqlite3.Connection, dec: RowDecoder) -> Iterator[tuple[int, Callable[[], bytes]]]:
    """(id, its logical bytes when called) of every record of a day file, ``rec`` rows and
    runs together, in id order (what the hash chain covers)."""
    rows = ((row[0], functools.partial(dec.logical, row)) for row in conn.execute("SELECT * FROM rec ORDER BY id"))
    return heapq.merge(rows, Runs(conn, dec).by_id(), key=lambda t: t[0])


def _merge(runs: Iterator[tuple[Any, ...]], expand: Callable[[tuple[Any, ...]], Iterator[tuple[int, int, Values]]]) -> Iterator[tuple[int, int, Values]]:
    """The records of ``runs`` (ordered by their least ts) in (ts, id) order. A run is
    opened only once no record before its least ts is left, so only the runs that
    overlap in time are open at once."""
    heap: list[tuple[int, int, Values, Iterator[tuple[int, int, Values]]]] = []
    pending = next(runs, None)
    while heap or pending is not None:
        while pending is not None and (not heap or pending[4] <= heap[0][0]):
            it = expand(pending)
            first = next(it, None)
            if first is not None:
                heapq.heappush(heap, (first[0], first[1], first[2], it))
            pending = next(runs, None)
        if not heap:
            continue
        ts, rid, vals, it = heap[0]
        yield ts, rid, vals
        nxt = next(it, None)
        if nxt is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (nxt[0], nxt[1], nxt[2], it))


def _const(b: bytes) -> Callable[[], bytes]:
    return lambda: b


def _broken(run: tuple[Any, ...], exc: Exception) -> Iterator[tuple[int, Callable[[], bytes]]]:
    first, cpid, count = run[0], run[2], run[3]
    n = count * (2 if cpid is not None else 1) if type(count) is int and 0 < count < 2**24 else 1

    def fail() -> bytes:
        raise ValueError(f"run {first}: {exc}")

    for k in range(n):
        yield first + k, fail
