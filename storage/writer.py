"""RecordWriter: the one task that owns the store's connections.

Strategy:

* Producers on the event loop call ``submit(record)``: a length check and a deque append,
  never an await and never disk. The queue is bounded (``queue_max``); when it is full the
  overflow policy applies (fail-open: drop, count, alarm; fail-closed: return False so the
  adapter refuses the flow; the refusals are alarmed too). Never a silent drop.
* Group commit: when the first record arrives at an idle writer, the writer waits at most
  ``commit_interval_ms`` (or until ``batch_max`` records are queued), then commits one
  transaction per day file. Records that arrive during a commit go into the next one
  straight away, so under load commits run back to back with whatever accumulated.
* ``submit_copies(copies)`` queues the DNS hit path's records (``storage.schema.Copies``:
  prototypes + per-copy values) as the records they stand for, all or none; they are
  encoded from each prototype's row, to the same rows and chain bytes.
* Rows are encoded on their own thread, 512 rows per INSERT (``storage.schema.chunk_plan``),
  while aiosqlite's thread has SQLite insert the previous chunk: SQLite releases the GIL
  while it steps, so encoding (Python) and inserting (C) overlap, and the event loop runs
  in between. The threads hand the GIL to each other a few times per chunk, so while a
  writer runs the interpreter's switch interval is ``GIL_SWITCH_S``. Signing, file checks
  and syslog forwarding run on helper threads.
* Durability: WAL with ``synchronous=FULL``; a record counts as committed (``committed``,
  ``flush()``) only after COMMIT returned. A crash rolls back at most the batch in flight.
* Every committed batch extends the day's hash chain (storage/chain.py); heads are signed
  into the digest log every ``sign_interval_s``, at day close (final), and at ``close()``.

Must not parse HTTP or DNS, and must not be awaited by the data path except ``flush``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import operator
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from linewarden import keys
from storage.chain import DigestLog, batch_hash_framed, frame, genesis, read_digests
from storage.config import StoreConfig
from storage.partitions import (
    DayRouter,
    StoreLock,
    day_bounds,
    day_of,
    day_path,
    init_sql,
    init_store,
    list_days,
    pragmas,
)
from storage.records import Alarm, Maintenance, Record
from storage.retention import deletable, disk_status, expired_days, remove_day
from storage import hits
from storage.schema import (
    COLUMNS,
    INSERT_BATCH,
    RUN_COLUMNS,
    RUN_DATA_COLUMNS,
    UPDATE_RKEY,
    Copies,
    Interner,
    Layout,
    RowEncoder,
    by_prototype,
    chunk_plan,
    group_hits,
    current_layouts,
    insert_statements,
    make_layout,
    multi_insert_sql,
)

log = logging.getLogger("linewarden.storage")
_TS = operator.itemgetter(2)
"""The ts of a ``Copies`` entry."""
US = 1_000_000
DISK_ALARM_EVERY_S = 3600
"""A disk_low alarm at most once an hour: loud enough, not a flood."""
RETRY_MAX_S = 30.0
GIL_SWITCH_S = 0.0005
"""The interpreter's switch interval while a writer runs (Python's default is 5 ms). The
encoder, the SQL thread and the event loop pass the GIL among them several times per
chunk, and a thread that wants it back waits up to one interval: at 5 ms the hand-offs,
not the work, set the writer's pace (measured: benchmarks/bench_store.py)."""
ENCODED_AHEAD = 2
"""Encoded chunks that may wait for SQLite: the encoder runs this far ahead, no further."""
SYSLOG_BACKLOG_MAX = 50
"""Committed batches waiting for the syslog thread before further batches are not forwarded."""


@dataclass(slots=True)
class DayState:
    """The writer's view of one open day file (owned by the writer task)."""

    day: str
    conn: aiosqlite.Connection
    interner: Interner
    encoder: RowEncoder
    next_id: int
    next_batch: int
    head: bytes
    signed_batch: int
    signed_final: bool
    last_sign: float
    last_used: float = 0.0

    @property
    def dirty(self) -> bool:
        return self.next_batch - 1 != self.signed_batch


@dataclass(slots=True)
class _Stats:
    accepted: int = 0
    committed: int = 0
    dropped: int = 0
    refused: int = 0
    alarmed_dropped: int = 0
    alarmed_refused: int = 0
    batches: int = 0
    bad_records: int = 0


class RecordWriter:
    """Writes records into a store directory (see the module docstring)."""

    def __init__(self, store_dir: str | os.PathLike[str], config: StoreConfig | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.store_dir = Path(store_dir)
        self.config = config or StoreConfig()
        self.clock = clock
        """Wall clock (seconds since the epoch) for rollover, retention and alarms; tests pass
        their own. Record times come from the records, never from here."""
        self._q: collections.deque[Record | Copies] = collections.deque()
        self._queued = 0
        """Records in ``_q`` (a ``Copies`` counts as the records it stands for)."""
        self._qmax = self.config.queue_max
        self._batch_max = self.config.batch_max
        self._fail_closed = self.config.overflow == "fail-closed"
        self._stats = _Stats()
        self._first_at: float | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._inject: list[Record] = []
        self._days: dict[str, DayState] = {}
        self._router = DayRouter(self.config.tz)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lw-store")
        self._encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lw-encode")
        self._lock = StoreLock(self.store_dir)
        self._digest: DigestLog | None = None
        self._key: keys.KeyPair | None = None
        self._signed: dict[str, tuple[int, bool]] = {}
        self._signed_heads: dict[str, tuple[int, str]] = {}
        self._today = ""
        self._last_disk_alarm = -1e18
        self._syslog: Any = None
        self._layouts = current_layouts()
        self.last_error: BaseException | None = None
        """The last error a commit hit (the writer retries; the queue bounds the damage)."""
        self._signal_task: asyncio.Task[None] | None = None
        self._syslog_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._syslog_backlog = 0
        self._switch_was = sys.getswitchinterval()

    # --- producer side (event loop thread; never awaits) -------------------------------

    def submit(self, record: Record) -> bool:
        """Queue ``record`` for writing. Never awaits and never touches the disk. Returns False
        only under ``overflow="fail-closed"`` when the queue is full: refuse the flow."""
        if self._queued >= self._qmax or self._closing:
            return self._overflow(1)
        self._enqueue(record, 1)
        return True

    def submit_copies(self, copies: Copies) -> bool:
        """Queue the records ``copies`` stands for (storage.schema.Copies), as ``submit``
        would one by one: all of them or, when the queue has no room for all, none."""
        n = copies.count
        if self._queued + n > self._qmax or self._closing:
            return self._overflow(n)
        self._enqueue(copies, n)
        return True

    def _enqueue(self, item: Record | Copies, n: int) -> None:
        q = self._q
        if not q:
            self._first_at = self._loop.time() if self._loop is not None else 0.0
            if self._wake is not None:
                self._wake.set()
        q.append(item)
        self._queued += n
        self._stats.accepted += n
        if self._queued >= self._batch_max and self._wake is not None:
            self._wake.set()

    def _overflow(self, n: int) -> bool:
        """``n`` records find the queue full: the overflow policy (module docstring)."""
        if self._fail_closed or self._closing:
            self._stats.refused += n
            wake = self._stats.refused - n == self._stats.alarmed_refused
        else:
            self._stats.dropped += n
            wake = self._stats.dropped - n == self._stats.alarmed_dropped
        if wake and self._wake is not None:
            self._wake.set()  # the alarm is written as soon as the writer can
        return not (self._fail_closed or self._closing)

    @property
    def committed(self) -> int:
        """Submitted records durably committed so far (in submission order)."""
        return self._stats.committed

    @property
    def dropped(self) -> int:
        """Records dropped under fail-open because the queue was full."""
        return self._stats.dropped

    @property
    def refused(self) -> int:
        """Records refused under fail-closed (or after close) because the queue was full."""
        return self._stats.refused

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def backlogged(self) -> bool:
        """Half the queue is full: producers that can wait (the workers' channels) should."""
        return self._queued * 2 >= self._qmax

    def stats(self) -> dict[str, int]:
        return dataclasses.asdict(self._stats) | {"queued": self._queued}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (create it, take the writer lock, load the key), reconcile
        signatures left by a crash, apply retention, and start the writer task."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._switch_was = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_was, GIL_SWITCH_S))
        if self._q:
            self._first_at = self._loop.time()
        await self._in_pool(self._open_store)
        await self._reconcile()
        await self._housekeeping(force_rollover=True)
        self._task = self._loop.create_task(self._run(), name="linewarden-record-writer")

    def _open_store(self) -> None:
        init_store(self.store_dir, self.config)
        self._lock.acquire()
        key_dir = self.config.key_dir or str(self.store_dir / "keys")
        self._key, created = keys.load_or_generate(key_dir)
        self._digest = DigestLog(self.store_dir)
        for _, e, _problem in read_digests(self._digest.path, None):
            if e is not None and e.event != "expired":
                self._signed[e.day] = (e.batch, e.final)
                self._signed_heads[e.day] = (e.batch, e.head)
        if created:
            self._inject.append(Maintenance(
                ts=int(self.clock() * US), admin="linewarden", operation="keys.init",
                target=str(key_dir), result="ok", source_ip="local",
            ))
        if self.config.syslog:
            from storage.export import SyslogSender

            self._syslog = SyslogSender(self.config.syslog)
            self._syslog_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lw-syslog")

    async def flush(self) -> None:
        """Return once every record submitted before the call is committed."""
        target = self._stats.accepted
        if self._stats.committed >= target or self._task is None:
            if self._task is None and self._stats.committed < target:
                raise RuntimeError("RecordWriter.flush() before start()")
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        assert self._wake is not None
        self._wake.set()
        await asyncio.shield(fut)

    async def close(self) -> None:
        """Flush everything, sign every open day's head, close the files, release the lock."""
        if self._task is None:
            return
        self._closing = True
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.shield(self._task)
        finally:
            self._task = None

    def install_signal_handlers(self, then: Callable[[], None] | None = None) -> None:
        """On SIGTERM or SIGINT: flush and close (nothing submitted is lost), then ``then()``."""
        loop = asyncio.get_running_loop()

        async def on_signal() -> None:
            await self.close()
            if then is not None:
                then()

        def handler() -> None:
            if self._signal_task is None:
                self._signal_task = loop.create_task(on_signal())

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handler)

    # --- the writer task -----------------------------------------------------------------

    async def _run(self) -> None:
        assert self._loop is not None and self._wake is not None
        loop, wake = self._loop, self._wake
        interval = self.config.commit_interval_ms / 1000
        next_house = loop.time() + self.config.housekeeping_s
        try:
            while True:
                urgent = self._closing or bool(self._waiters) or self._overflow_pending()
                if not self._q and not urgent and not self._inject:
                    wake.clear()
                    await self._wait(wake, next_house - loop.time())
                elif self._q and self._queued < self._batch_max and not urgent:
                    deadline = (self._first_at if self._first_at is not None else loop.time()) + interval
                    wake.clear()
                    await self._wait(wake, min(deadline, next_house) - loop.time())
                    if self._queued < self._batch_max and not self._closing and not self._waiters and loop.time() < deadline and not self._overflow_pending():
                        if loop.time() >= next_house:
                            next_house = await self._house_tick(next_house)
                        continue
                if self._q or self._inject or self._overflow_pending():
                    await self._commit_some()
                self._resolve_waiters()
                if loop.time() >= next_house:
                    next_house = await self._house_tick(next_house)
                if self._closing and not self._q and not self._inject:
                    break
        finally:
            await self._shutdown()

    async def _house_tick(self, next_house: float) -> float:
        assert self._loop is not None
        try:
            await self._housekeeping()
        except Exception as exc:  # housekeeping must never stop the writer
            log.exception("storage housekeeping failed")
            self.last_error = exc
        return self._loop.time() + self.config.housekeeping_s

    @staticmethod
    async def _wait(ev: asyncio.Event, timeout: float) -> None:
        if timeout <= 0:
            return
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass

    def _overflow_pending(self) -> bool:
        s = self._stats
        return s.dropped > s.alarmed_dropped or s.refused > s.alarmed_refused

    def _overflow_alarms(self) -> list[Record]:
        s, now = self._stats, int(self.clock() * US)
        out: list[Record] = []
        if s.dropped > s.alarmed_dropped:
            n, s.alarmed_dropped = s.dropped - s.alarmed_dropped, s.dropped
            out.append(Alarm(ts=now, action="log", alarm_kind="queue_overflow",
                             detail=f"{n} records dropped (fail-open): writer queue full at queue_max={self._qmax}; {s.dropped} dropped in total"))
        if s.refused > s.alarmed_refused:
            n, s.alarmed_refused = s.refused - s.alarmed_refused, s.refused
            out.append(Alarm(ts=now, action="log", alarm_kind="queue_overflow",
                             detail=f"{n} records refused (fail-closed): writer queue full at queue_max={self._qmax}; flows were refused; {s.refused} refused in total"))
        return out

    def _resolve_waiters(self) -> None:
        if not self._waiters:
            return
        done = self._stats.committed
        keep = []
        for target, fut in self._waiters:
            if target <= done:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def _commit_some(self) -> None:
        """Take up to batch_max queued records (plus pending alarms) and commit them, one
        transaction per day file. On a failure the batch is rolled back and retried with
        backoff (the queue bounds the damage), so nothing acknowledged is lost."""
        assert self._loop is not None
        q = self._q
        taken: list[Record | Copies] = []
        n = 0
        while q and n < self._batch_max:
            item = q.popleft()
            taken.append(item)
            n += item.count if type(item) is Copies else 1
        self._queued -= n
        self._first_at = self._loop.time() if not q else float("-inf")
        records = self._inject + self._overflow_alarms() + taken
        self._inject = []
        for day, recs in self._route(records).items():
            st = await self._day(day)
            delay = 0.5
            while True:
                try:
                    await self._write(st, recs)
                    break
                except Exception as exc:
                    self.last_error = exc
                    log.exception("storage commit of %s batch %d failed; retrying in %.1fs", st.day, st.next_batch, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
        self._stats.committed += n
        self._stats.batches += 1
        self._resolve_waiters()
        if self._syslog is not None:
            self._forward(records)

    def _forward(self, items: list[Record | Copies]) -> None:
        """Hand a committed batch to the syslog thread; a collector that cannot keep up
        costs counted failures (``SyslogSender.failed``), never the writer's time."""
        records = [r for it in items for r in (it.records() if type(it) is Copies else (it,))]
        if self._syslog_backlog >= SYSLOG_BACKLOG_MAX:
            self._syslog.failed += len(records)  # type: ignore[union-attr]
            return
        self._syslog_backlog += 1

        def done(_f: object) -> None:
            self._syslog_backlog -= 1

        assert self._syslog_pool is not None
        self._syslog_pool.submit(self._syslog.send_many, records).add_done_callback(done)  # type: ignore[union-attr]

    def _route(self, records: list[Record | Copies]) -> dict[str, list[Record | Copies]]:
        """Group by day. Something that is not a record, or has no int ``ts``, becomes a
        ``bad_record`` alarm carrying it (never a silent drop)."""
        groups: dict[str, list[Record | Copies]] = {}
        route = self._router
        for r in records:
            if type(r) is Copies:
                if route.lo <= r.lo and r.hi < route.hi:
                    groups.setdefault(route.day, []).append(r)
                else:
                    for day, part in r.split(route).items():
                        groups.setdefault(day, []).append(part)
                continue
            if not isinstance(r, Record) or type(r.ts) is not int:
                r = self._bad_record(r, TypeError("not a Record with an int ts"), int(self.clock() * US))
            ts = r.ts
            day = route.day if route.lo <= ts < route.hi else route(ts)  # one comparison, usually
            g = groups.get(day)
            if g is None:
                g = groups[day] = []
            g.append(r)
        return groups

    def _bad_record(self, r: Any, exc: Exception, ts: int) -> Record:
        self._stats.bad_records += 1
        try:
            body = msgspec.json.encode(r).decode()
        except Exception:
            body = repr(r)
        log.error("bad record turned into an alarm: %s", exc)
        return Alarm(ts=ts, action="log", alarm_kind="bad_record", detail=f"{exc}: {body[:4000]}")

    async def _write(self, st: DayState, recs: list[Record | Copies]) -> None:
        """One transaction: the rows, the new interned strings, the batch and its hash.

        ``_Encoding`` runs on the encoder thread, chunk after chunk; ``executemany`` on
        the connection's thread takes the chunks as they come."""
        c = st.conn
        first, n = st.next_id, st.next_batch
        enc = _Encoding(st, recs, self._bad_record)
        assert self._loop is not None
        encoding = self._loop.run_in_executor(self._encoder, enc.run)
        try:
            await c.execute("BEGIN IMMEDIATE")
            for size, lo, hi in await asyncio.wrap_future(enc.planned):
                await c.executemany(multi_insert_sql("rec", COLUMNS, size), enc.chunks((hi - lo) // size))
            hashed = await encoding
            assert hashed is not None  # None only once the transaction is abandoned
            head, count = hashed
            for table, columns, rows in (("protos", COLUMNS, st.encoder.take_protos()), ("runs", RUN_COLUMNS, enc.runs),
                                         ("run_data", RUN_DATA_COLUMNS, enc.run_data)):
                for sql, params in insert_statements(table, columns, rows):
                    await c.execute(sql, params)
            new_strs, new_rkeys = st.interner.take()
            for sql, params in insert_statements("strs", ("id", "v", "rkey"), new_strs):
                await c.execute(sql, params)
            if new_rkeys:
                await c.executemany(UPDATE_RKEY, new_rkeys)
            await c.execute(INSERT_BATCH, (n, first, first + count - 1, enc.span[0], enc.span[1], head))
            await c.execute("COMMIT")
        except BaseException:
            enc.abandon()  # the encoder must be done with the interner before it is rebuilt
            await asyncio.wait([encoding])
            if not encoding.cancelled():
                encoding.exception()  # retrieved: the error that matters is the one raised below
            # The interner already holds this batch's strings: rebuild it from the file.
            try:
                await c.execute("ROLLBACK")
            except Exception:
                pass
            st.interner.load(await c.execute_fetchall("SELECT id, v, rkey FROM strs"))
            st.encoder.forget_protos(await _next_proto(c))
            raise
        st.next_id, st.next_batch, st.head = first + count, n + 1, head
        st.last_used = self._loop.time()

    # --- day files ---------------------------------------------------------------------------

    async def _day(self, day: str) -> DayState:
        st = self._days.get(day)
        if st is not None:
            return st
        while len(self._days) >= self.config.max_open_days:
            lru = min(self._days.values(), key=lambda s: s.last_used)
            await self._close_day(lru)
        st = await self._open_day(day)
        self._days[day] = st
        return st

    async def _open_day(self, day: str) -> DayState:
        path = day_path(self.store_dir, day)
        conn = await aiosqlite.connect(path, isolation_level=None)
        for p in pragmas(self.config.synchronous):
            await conn.execute(p)
        await conn.execute("BEGIN IMMEDIATE")
        for sql, args in init_sql(day, self.config.timezone, self.config.forensic):
            await conn.execute(sql, args)
        existing = await conn.execute_fetchall("SELECT code, tag, fields FROM kinds")
        by_tag: dict[str, Layout] = {}
        next_code = max((r[0] for r in existing), default=-1) + 1
        for tag, fields in self._layouts.items():
            match = [r for r in existing if r[1] == tag and tuple(msgspec.json.decode(r[2])) == fields]
            if match:
                code = match[0][0]
            else:
                code, next_code = next_code, next_code + 1
                await conn.execute("INSERT INTO kinds(code, tag, fields) VALUES (?, ?, ?)", (code, tag, msgspec.json.encode(list(fields)).decode()))
            by_tag[tag] = make_layout(code, tag, fields)
        await conn.execute("COMMIT")
        strs = await conn.execute_fetchall("SELECT id, v, rkey FROM strs")
        interner = Interner(strs)
        last = await conn.execute_fetchall("SELECT n, last_id, hash FROM batches ORDER BY n DESC LIMIT 1")
        max_id = (await conn.execute_fetchall(
            "SELECT max(coalesce((SELECT max(id) FROM rec), 0), "
            "coalesce((SELECT max(first_id + count * (1 + (companion IS NOT NULL)) - 1) FROM runs), 0))"))[0][0]
        if last:
            n, last_id, head = last[0]
            next_batch, head = n + 1, bytes(head)
            next_id = max(last_id, max_id) + 1
        else:
            next_batch, head, next_id = 0, genesis(day), max_id + 1
        signed_batch, signed_final = self._signed.get(day, (-1, False))
        assert self._loop is not None
        encoder = RowEncoder(by_tag, interner)
        encoder.forget_protos(await _next_proto(conn))
        return DayState(day, conn, interner, encoder, next_id, next_batch, head,
                        signed_batch, signed_final, self._loop.time(), self._loop.time())

    def _ended(self, day: str, now: float) -> bool:
        _, end = day_bounds(day, self.config.tz)
        return end + self.config.close_grace_s * US <= now * US

    async def _sign(self, day: str, batch: int, last_id: int, head: bytes, final: bool, event: str | None = None) -> None:
        assert self._digest is not None and self._key is not None
        ev = event or ("close" if final else "checkpoint")
        await self._in_pool(lambda: self._digest.append(  # type: ignore[union-attr]
            self._key, event=ev, day=day, batch=batch, last_id=last_id, head=head, at=int(self.clock() * US)))  # type: ignore[arg-type]
        if ev != "expired":
            self._signed[day] = (batch, final)
            self._signed_heads[day] = (batch, head.hex())

    async def _sign_state(self, st: DayState, final: bool) -> None:
        await self._sign(st.day, st.next_batch - 1, st.next_id - 1, st.head, final)
        st.signed_batch, st.signed_final = st.next_batch - 1, final
        st.last_sign = self._loop.time()  # type: ignore[union-attr]

    async def _close_day(self, st: DayState) -> None:
        final = self._ended(st.day, self.clock())
        if st.dirty or (final and not st.signed_final):
            await self._sign_state(st, final)
        try:
            await st.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            await st.conn.close()
            self._days.pop(st.day, None)

    async def _reconcile(self) -> None:
        """After a crash: sign heads that were committed but not yet signed, and close days
        that ended while the writer was down."""
        now = self.clock()
        for day in list_days(self.store_dir):
            signed = self._signed.get(day)
            ended = self._ended(day, now)
            head = await self._in_pool(_read_head, day_path(self.store_dir, day))
            if head is None:
                continue
            n, last_id, h = head
            if signed is None or signed[0] != n or (ended and not signed[1]):
                # Never sign over a change made while the writer was down: the head signed
                # last time must still be in the file, else alarm and leave it to verify.
                sb, shead = self._signed_heads.get(day, (-1, genesis(day).hex()))
                stored = await self._in_pool(_hash_at, day_path(self.store_dir, day), sb)
                if stored is not None and stored.hex() != shead:
                    self._inject.append(Alarm(
                        ts=int(now * US), action="log", alarm_kind="integrity_failure",
                        detail=f"day {day}: batch {sb} no longer has the signed chain head; not re-signed (run `linewarden verify`)"))
                    continue
                await self._sign(day, n, last_id, h if n >= 0 else genesis(day), ended)

    async def _housekeeping(self, force_rollover: bool = False) -> None:
        now = self.clock()
        for st in list(self._days.values()):
            if self._ended(st.day, now):
                await self._close_day(st)
            elif st.dirty and self._loop.time() - st.last_sign >= self.config.sign_interval_s:  # type: ignore[union-attr]
                await self._sign_state(st, False)
        today = day_of(int(now * US), self.config.tz)
        if today != self._today or force_rollover:
            self._today = today
            await self._retention(today)
        await self._check_disk()

    async def _retention(self, today: str) -> None:
        for day in expired_days(list_days(self.store_dir), today, self.config):
            if not await self._in_pool(deletable, self.store_dir, day):
                continue
            st = self._days.get(day)
            if st is not None:
                await self._close_day(st)
            head = await self._in_pool(_read_head, day_path(self.store_dir, day))
            n, last_id, h = head if head else (-1, 0, genesis(day))
            await self._sign(day, n, last_id, h, True, event="expired")
            await self._in_pool(remove_day, self.store_dir, day)
            self._signed.pop(day, None)
            log.info("retention: removed day %s (older than %d days)", day, self.config.retention_days)

    async def _check_disk(self) -> None:
        ds = await self._in_pool(disk_status, self.store_dir, self.config)
        now = self.clock()
        if ds.low and now - self._last_disk_alarm >= DISK_ALARM_EVERY_S:
            self._last_disk_alarm = now
            self._inject.append(Alarm(ts=int(now * US), action="log", alarm_kind="disk_low",
                                      detail=f"audit store {self.store_dir}: {ds.describe()}; nothing inside retention is deleted"))
            if self._wake is not None:
                self._wake.set()

    async def _shutdown(self) -> None:
        for st in list(self._days.values()):
            try:
                await self._close_day(st)
            except Exception:
                log.exception("closing day %s", st.day)
        self._resolve_waiters()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(RuntimeError("RecordWriter closed before the flush completed"))
        if self._syslog_pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._syslog_pool.shutdown, True)
            self._syslog.close()  # type: ignore[union-attr]
        self._pool.shutdown(wait=True)
        self._encoder.shutdown(wait=True)
        self._lock.release()
        sys.setswitchinterval(self._switch_was)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._pool, fn, *args)


@dataclass(slots=True)
class _HitGroup:
    """One prototype's copies among a batch's packed copies (``schema.group_hits``)."""

    packs: list[tuple[bytes, dict[int, Any]]]
    proto: Record
    companion: Record | None
    at: bytes
    """Its copies' (pack, record) pairs, as native unsigned ints."""


class _Encoding:
    """The encoder thread's part of one transaction: which copies become runs
    (storage/runs.py) and so how many ``rec`` rows there are (``planned``), those rows in
    ``chunk_plan`` chunks handed to the SQL thread through a queue of ``ENCODED_AHEAD``,
    the runs, then the batch's hash. Ids: the rows first, then the runs."""

    RUNS = True
    """Copies of one prototype go in runs (False: each in a row of its own, as format 1
    did; the tests compare the two)."""

    def __init__(self, st: DayState, recs: list[Record | Copies], bad_record: Callable[[Any, Exception, int], Record]) -> None:
        self.st, self.recs, self.bad_record = st, recs, bad_record
        self.first = st.next_id
        self.planned: concurrent.futures.Future[list[tuple[int, int, int]]] = concurrent.futures.Future()
        """``chunk_plan`` of the ``rec`` rows, once the encoder thread knows their number."""
        self.runs: list[tuple[Any, ...]] = []
        """Rows of ``runs``, complete once ``run`` returned."""
        self.run_data: list[tuple[int, bytes]] = []
        """Rows of ``run_data``, likewise."""
        self.framed: list[bytes] = []
        """The runs' records as the chain hashes them (``chain.frame``), in id order."""
        self.in_runs = 0
        """Records in the runs."""
        self.logical: list[bytes] = []
        self.span = [2**63, -(2**63)]
        """Least and greatest ``ts`` of the batch's records."""
        self._ready: queue.Queue[list[Any] | BaseException] = queue.Queue(ENCODED_AHEAD)
        self._stop = threading.Event()

    def run(self) -> tuple[bytes, int] | None:
        """(batch hash, records) once every chunk is handed over; None if abandoned first."""
        try:
            try:
                groups = self._arrange()
            except Exception:  # a bug here must not stop the store: the copies go in as rows
                log.exception("storage: runs of copies failed, written as rows")
                groups = []
            plan = chunk_plan(sum(r.count if type(r) is Copies else 1 for r in self.recs))
            self.planned.set_result(plan)
            rows = self._rows()
            for size, lo, hi in plan:
                for k in range(lo, hi, size):
                    flat: list[Any] = []
                    for _ in range(size):
                        flat.extend(next(rows))
                    if not self._put(flat):
                        return None
            row_id = self.first + len(self.logical)
            for g in groups:
                row_id = self._run(g, row_id)
            self.in_runs = row_id - self.first - len(self.logical)
        except BaseException as exc:
            if not self.planned.done():
                self.planned.set_exception(exc)
            self._put(exc)
            raise
        framed = [frame(self.logical), *self.framed]
        count = len(self.logical) + self.in_runs
        return batch_hash_framed(self.st.head, self.st.next_batch, self.first, framed, count), count

    def _arrange(self) -> list[Any]:
        """Take the copies that can be runs out of ``recs``: grouped by prototype (and
        companion), each group in ts order (or, for copies kept packed, a ``_HitGroup``
        that C puts in ts order). The rest stays in ``recs`` as rows."""
        copies = [r for r in self.recs if type(r) is Copies]
        if not self.RUNS or not copies:
            return []
        recs = [r for r in self.recs if type(r) is not Copies]
        runnable = self.st.encoder.runnable
        groups: list[Any] = []
        packed = group_hits(copies)  # type: ignore[arg-type]
        if packed is not None:
            packs, found = packed
            for proto, companion, at in found:
                if runnable(proto, companion):
                    groups.append(_HitGroup(packs, proto, companion, at))
                else:
                    recs.append(Copies.of(hits.entries_at(packs, at)))
        else:
            for g in by_prototype(copies):  # type: ignore[arg-type]
                if runnable(g[0][0], g[0][1]):
                    g.sort(key=_TS)
                    groups.append(g)
                else:
                    recs.append(Copies.of(g))
        self.recs = recs
        return groups

    def _run(self, group: Any, row_id: int) -> int:
        """One run of ``group``'s copies, their records from ``row_id`` on; the id after them."""
        got = None
        if type(group) is _HitGroup:
            got = self.st.encoder.encode_hit_run(group.packs, group.at, group.proto, group.companion)
            if got is None:  # C could not: the entries, as for copies given as a list
                group = sorted(hits.entries_at(group.packs, group.at), key=_TS)
        if got is None:
            lo, hi = group[0][2], group[-1][2]
            got = (*self.st.encoder.encode_run(group, row_id), len(group), lo, hi)
        pid, cpid, data, framed, n, lo, hi = got
        self.runs.append((row_id, pid, cpid, n, lo, hi))
        self.run_data.append((row_id, data))
        self.framed.append(framed)
        span = self.span
        span[0], span[1] = min(span[0], lo), max(span[1], hi)
        return row_id + n * (1 if cpid is None else 2)

    def chunks(self, count: int) -> Iterator[list[Any]]:
        """The next ``count`` chunks, flat (the SQL thread's side)."""
        for _ in range(count):
            flat = self._ready.get()
            if isinstance(flat, BaseException):
                raise flat
            yield flat

    def abandon(self) -> None:
        self._stop.set()

    def _rows(self) -> Iterator[tuple[Any, ...]]:
        """Every row of the batch in order, its logical bytes appended to ``logical``."""
        row_id, span, encoder, logical = self.first, self.span, self.st.encoder, self.logical
        for r in self.recs:
            if type(r) is Copies:
                # Before the rows: once the last is taken, this generator runs no further.
                span[0], span[1] = min(span[0], r.lo), max(span[1], r.hi)
                for row in encoder.encode_copies(r, row_id, logical):
                    row_id += 1
                    yield row
                continue
            try:
                row, lg = encoder.encode(r, row_id)
            except Exception as exc:  # any field the encoder chokes on: else the batch retries forever
                row, lg = encoder.encode(self.bad_record(r, exc, r.ts), row_id)
            row_id += 1
            logical.append(lg)
            ts = row[2]
            if ts < span[0]:
                span[0] = ts
            if ts > span[1]:
                span[1] = ts
            yield row

    def _put(self, item: list[Any] | BaseException) -> bool:
        """Hand ``item`` to the SQL thread; False once the transaction is abandoned."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False


async def _next_proto(conn: aiosqlite.Connection) -> int:
    return (await conn.execute_fetchall("SELECT coalesce(max(id), 0) + 1 FROM protos"))[0][0]


def _read_head(path: Path) -> tuple[int, int, bytes] | None:
    import sqlite3

    try:
        conn = sqlite3.connect(path)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT n, last_id, hash FROM batches ORDER BY n DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return (row[0], row[1], bytes(row[2])) if row else (-1, 0, b"")


def _hash_at(path: Path, n: int) -> bytes | None:
    """The stored chain hash of batch ``n`` (genesis for -1), or None when unreadable."""
    import sqlite3

    if n < 0:
        return genesis(path.name[:10])
    try:
        conn = sqlite3.connect(path)
        try:
            row = conn.execute("SELECT hash FROM batches WHERE n = ?", (n,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return bytes(row[0]) if row else b""


def write_records(store_dir: str | os.PathLike[str], records: Iterable[Record], config: StoreConfig | None = None, *, clock: Callable[[], float] = time.time) -> int:
    """Write ``records`` synchronously (offline tools: replay, imports, benchmarks) and
    return how many were committed. Applies back-pressure instead of dropping: when the
    queue is full it waits for the writer. Safe to call from inside a running event loop
    (it then runs on its own thread)."""
    cfg = config or StoreConfig()

    async def run() -> int:
        w = RecordWriter(store_dir, cfg, clock=clock)
        await w.start()
        try:
            for r in records:
                while len(w._q) >= w._qmax:
                    await w.flush()
                w.submit(r)
                if len(w._q) >= w._batch_max:
                    await asyncio.sleep(0)
        finally:
            await w.close()
        return w.committed

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run())
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, run()).result()
