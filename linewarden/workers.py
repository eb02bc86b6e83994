"""Worker processes (the DNS shim's and the HTTP proxy's) and the record channel
that feeds the one writer.

Owns: starting N processes of a service that share its listen port
(SO_REUSEPORT, ``WorkerPool``), starting another in place of one that dies,
the socketpair each uses to send its records to the main process in batches (``ChannelSink`` → ``ChannelReader`` → ``RecordWriter.submit``),
and their orderly stop. Must not: decide anything about traffic or write SQL.

Why processes: the store writer (encoding, chain hashing, SQLite) costs tens of
microseconds of CPU per record and shares the GIL with whatever runs in its
process, so its group commits stall an in-process shim. Measured with
``benchmarks/bench_dns.py --workers 0`` against ``--workers 2`` on the shared
2-core machine: cache hits 22.9k vs 24.3k queries/s, misses 8.0k vs 9.3k, and
the misses' p99 latency 204 ms vs 55 ms. So the writer stays in the main process
and DNS is answered elsewhere; with ``dns.workers = 2`` two shims split the port.
The kernel spreads datagrams over the group with a classic-BPF program returning
a random index (SO_ATTACH_REUSEPORT_CBPF): the default 4-tuple hash would put
every query of one client (or of a benchmark with 4 source ports) on one worker.

Channel format: frames of a 4-byte big-endian length, one type byte and a
payload: ``H`` + JSON hello (pid, bound addresses), ``R`` + msgpack list of
records (the storage schema's tagged structs), ``S`` + JSON stats, and for the
DNS hit path (proxy/dns_hits.py) ``T`` + msgpack (number, template) and ``C`` +
hit records (``HIT_RECORD``, 28 bytes each), which the reader keeps packed
(storage/hits.py). The main
process writes on the same socketpair to reload rules (issue 7): ``L`` + JSON
{seq, dir}; the worker compiles ``dir`` in a thread off its loop, swaps its
``EngineRef`` and answers ``A`` + JSON {seq, ok, version, error}
(linewarden/reload.py drives it; ``reload_worker`` / ``serve_reloads`` below).

Durability note: a worker holds records for at most ``CHANNEL_FLUSH_S`` before
sending them; the writer then commits within its own ``commit_interval_ms``.
SIGTERM loses nothing (the worker flushes, the reader drains to EOF, then the
writer closes); ``kill -9`` of a worker loses at most its unsent batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import gc
import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import threading
from dataclasses import dataclass, field, replace
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec

from linewarden.config import DnsConfig
from proxy import dns_hits
from proxy.http_service import HttpServiceConfig
from proxy.identity import Binding, Identity
from storage.records import AnyRecord, Record
from storage.schema import COMPANION_FIELDS, COPY_FIELDS

log = logging.getLogger("linewarden.workers")

CHANNEL_BATCH = 512
"""Records per frame at most: large enough that framing costs nothing, small
enough (~100 KB) that a frame never stalls the reader's loop."""
CHANNEL_FLUSH_S = 0.02
"""A worker sends what it holds at least this often: well under the writer's
200 ms commit interval, so batching here adds little to a record's latency."""
CHANNEL_MAX_BUFFER = 32 << 20
"""Bytes a worker may have queued unsent to the main process (~150k records).
Past it the store's overflow policy applies in the worker: fail-open drops
and counts, fail-closed refuses (the shim answers SERVFAIL)."""
HIT_PATH_MAX_BUFFER = 1 << 20
"""Bytes a DNS worker may have queued unsent and still answer on the compiled hit path
(proxy/dns_hits.py). Past it the main process is behind (its writer backlogged, it stopped
reading): the shim holds its UDP listener until the channel drains (``_hold_udp`` in
proxy/dns_shim.py, at most ``HOLD_MAX_S``; then the Python path, whose per-record overflow
policy applies at ``CHANNEL_MAX_BUFFER``). So a fast path never outruns the store."""
BACKLOG_POLL_S = 0.01
"""While the writer is backlogged the channel readers stop reading; they look again this often."""
BACKLOG_PAUSE_MAX_S = 2.0
"""Longest a channel reader pauses in one backlog. A busy writer drains in far less; past it
the writer is stuck, and reading goes on so that its overflow policy (with its alarms)
decides, as it would without the pause. No pause again until the backlog has cleared."""
START_TIMEOUT_S = 60.0
"""A worker must compile the rule set and bind within this, or start fails."""
STOP_TIMEOUT_S = 10.0
"""A worker gets this long after SIGTERM to flush before it is killed."""
RESTART_DELAY_S = 0.5
"""Wait before starting a worker again after it died (doubling up to the max on failures),
so a worker that dies at once does not spin."""
RESTART_DELAY_MAX_S = 30.0

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_AD_RANDOM = -0x1000 + 56


def freeze_long_lived() -> None:
    """Take what a worker has built so far out of the cyclic GC's sight.

    The compiled rule set (100k+ objects) lives as long as the process; if the GC
    tracked it, every full collection would walk it (latency spikes on the data path)."""
    gc.collect()
    gc.freeze()


def attach_random_reuseport(sock: socket.socket, n: int) -> bool:
    """Spread a SO_REUSEPORT group's packets at random over its ``n`` sockets.

    cBPF program: ``ld rand; mod #n; ret a``. Returns False where the kernel
    refuses (the default 4-tuple hash then applies).
    """
    if n < 2:
        return True
    insns = [(0x20, 0, 0, SKF_AD_RANDOM & 0xFFFFFFFF),  # BPF_LD|BPF_W|BPF_ABS
             (0x94, 0, 0, n),                           # BPF_ALU|BPF_MOD|BPF_K
             (0x16, 0, 0, 0)]                           # BPF_RET|BPF_A
    prog = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HL", len(insns), ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as e:
        log.warning("SO_ATTACH_REUSEPORT_CBPF refused (%s); kernel hash spreads DNS", e)
        return False
    return True


_record_decoder = msgspec.msgpack.Decoder(list[AnyRecord])  # type: ignore[valid-type]
_template_decoder = msgspec.msgpack.Decoder(tuple[int, dns_hits.Template])
_encoder = msgspec.msgpack.Encoder()
_shared: dict[bytes, tuple[Any, Any]] = {}
SHARED_PROTOTYPES_MAX = 2 * dns_hits.TEMPLATE_MAX
"""Distinct hit-path prototypes the main process shares among its workers (then cleared)."""


def shared_prototypes(proto: Any, alarm: Any) -> tuple[Any, Any]:
    """One object for equal prototypes, whichever worker sent them: each DNS worker has
    its own templates for the same names, and the writer keeps the copies of one
    prototype object as one run (storage/runs.py) and the DNS join learns once per
    object, so sharing halves both with two workers."""
    rep = msgspec.structs.replace
    # Keyed without what each copy replaces.
    key = _encoder.encode((rep(proto, **dict.fromkeys(COPY_FIELDS)),
                           alarm and rep(alarm, **dict.fromkeys(COMPANION_FIELDS))))
    got = _shared.get(key)
    if got is None:
        if len(_shared) >= SHARED_PROTOTYPES_MAX:
            _shared.clear()
        got = _shared[key] = (proto, alarm)
    return got


def frame(kind: bytes, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload) + 1) + kind + payload


class ChannelSink:
    """A worker's ``RecordSink``: batches records to the main process (never awaits)."""

    def __init__(self, transport: asyncio.Transport, fail_open: bool) -> None:
        self.transport = transport
        self.fail_open = fail_open
        self.buf: list[Record] = []
        self.hit_buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        self.refused = 0
        self.sent = 0

    def submit(self, record: Record) -> bool:
        if self.transport.get_write_buffer_size() > CHANNEL_MAX_BUFFER or self.transport.is_closing():
            if self.fail_open:
                self.dropped += 1
                return True
            self.refused += 1
            return False
        self.buf.append(record)
        if len(self.buf) >= CHANNEL_BATCH:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(CHANNEL_FLUSH_S, self.flush)
        return True

    def accepting(self) -> bool:
        """The main process keeps up: the DNS hit path runs only then (``HIT_PATH_MAX_BUFFER``)."""
        return self.transport.get_write_buffer_size() <= HIT_PATH_MAX_BUFFER and not self.transport.is_closing()

    def template(self, tid: int, tmpl: dns_hits.Template) -> None:
        """A hit-path record template, sent at once: it precedes every hit that names it,
        and follows every hit held (a number reused after a wrap must not rename them)."""
        if self.hit_buf:
            self.flush()
        self.transport.write(frame(b"T", _encoder.encode((tid, tmpl))))

    def hits(self, records: bytes) -> None:
        """Hit records (28 bytes each), batched like the others."""
        self.hit_buf += records
        n = len(self.hit_buf) // dns_hits.HIT_RECORD.size
        if n >= CHANNEL_BATCH * 4:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(CHANNEL_FLUSH_S, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.buf and not self.transport.is_closing():
            self.transport.write(frame(b"R", _encoder.encode(self.buf)))
            self.sent += len(self.buf)
        self.buf = []
        if self.hit_buf and not self.transport.is_closing():
            self.transport.write(frame(b"C", bytes(self.hit_buf)))
            self.sent += len(self.hit_buf) // dns_hits.HIT_RECORD.size
        self.hit_buf.clear()

    def send(self, kind: bytes, obj: Any) -> None:
        self.transport.write(frame(kind, json.dumps(obj).encode()))


class _SinkProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.drained = asyncio.Event()
        self.drained.set()
        self.lost = asyncio.Event()
        """The main process went away (EOF on the channel): a worker must not outlive
        it, holding the port and answering queries nobody records."""

        self.on_frame: Callable[[bytes, bytes], None] | None = None
        """Called with (kind, payload) for frames from the main process (``L``: reload)."""
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 4:
            n = int.from_bytes(self._buf[:4], "big")
            if len(self._buf) < 4 + n:
                return
            kind, payload = bytes(self._buf[4:5]), bytes(self._buf[5:4 + n])
            del self._buf[:4 + n]
            if self.on_frame is not None:
                self.on_frame(kind, payload)

    def eof_received(self) -> bool | None:
        self.lost.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.drained.set()

    def pause_writing(self) -> None:
        self.drained.clear()

    def resume_writing(self) -> None:
        self.drained.set()


class ChannelReader(asyncio.Protocol):
    """Main-process side of one worker's channel: frames → ``writer.submit``."""

    def __init__(self, writer: Any, worker: WorkerHandle,
                 on_lost: Callable[[WorkerHandle], None] | None = None) -> None:
        self.writer = writer
        self.worker = worker
        self.on_lost = on_lost
        self.buf = bytearray()
        self.paused = False
        self.paused_at = 0.0
        self.overridden = False
        """A pause ran out (``BACKLOG_PAUSE_MAX_S``): none again until the backlog clears."""
        self.templates: dict[int, dns_hits.Template] = {}
        """The worker's hit-path templates by number (at most ``dns_hits.TEMPLATE_MAX``)."""
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + n:
                return
            kind, payload = self.buf[4:5], bytes(self.buf[5:4 + n])
            del self.buf[:4 + n]
            try:
                self._frame(bytes(kind), payload)
            except Exception:
                log.exception("bad frame from dns worker %d", self.worker.index)
        backlogged = getattr(self.writer, "backlogged", False)
        if not backlogged:
            self.overridden = False
        elif not self.paused and not self.overridden and self.transport is not None:
            # The writer is behind: leave the records in the worker's socket buffer (it then
            # slows down, see HIT_PATH_MAX_BUFFER) rather than drop them here.
            loop = asyncio.get_running_loop()
            self.paused, self.paused_at = True, loop.time()
            self.transport.pause_reading()
            loop.call_later(BACKLOG_POLL_S, self._resume_when_drained)

    def _resume_when_drained(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        if getattr(self.writer, "backlogged", False):
            if loop.time() - self.paused_at < BACKLOG_PAUSE_MAX_S:
                loop.call_later(BACKLOG_POLL_S, self._resume_when_drained)
                return
            self.overridden = True
        self.paused = False
        self.transport.resume_reading()

    def _frame(self, kind: bytes, payload: bytes) -> None:
        if kind == b"R":
            submit = self.writer.submit
            records = _record_decoder.decode(payload)
            for rec in records:
                if not submit(rec):
                    self.worker.refused += 1
            self.worker.records += len(records)
        elif kind == b"C":
            copies = dns_hits.copies(payload, self.templates)
            submit_copies = getattr(self.writer, "submit_copies", None)
            if submit_copies is not None:
                if not submit_copies(copies):
                    self.worker.refused += copies.count
            else:
                for rec in copies.records():
                    if not self.writer.submit(rec):
                        self.worker.refused += 1
            self.worker.records += copies.count
        elif kind == b"T":
            tid, (prefix, proto, alarm) = _template_decoder.decode(payload)
            self.templates[tid] = (prefix, *shared_prototypes(proto, alarm))
        elif kind == b"H":
            hello = json.loads(payload)
            self.worker.udp_address = tuple(hello["udp"])
            self.worker.tcp_address = tuple(hello["tcp"])
            if not self.worker.ready.done():
                self.worker.ready.set_result(True)
        elif kind == b"S":
            self.worker.stats = json.loads(payload)
        elif kind == b"E":
            if not self.worker.ready.done():
                self.worker.ready.set_exception(RuntimeError(payload.decode(errors="replace")))
        elif kind == b"A":
            ack = json.loads(payload)
            fut = self.worker.acks.pop(ack.get("seq"), None)
            if fut is not None and not fut.done():
                fut.set_result(ack)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.worker.ready.done():
            self.worker.ready.set_exception(RuntimeError("dns worker exited before it was ready"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost(self.worker)


@dataclass
class WorkerHandle:
    index: int
    process: Any = None
    reader: ChannelReader | None = None
    ready: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    udp_address: tuple[Any, ...] | None = None
    tcp_address: tuple[Any, ...] | None = None
    records: int = 0
    refused: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    acks: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    """Reloads sent to the worker, waiting for its ``A`` frame (by sequence number)."""


RELOAD_TIMEOUT_S = 300.0
"""A worker must compile and swap a new rule set within this (a 1M-domain +
100k-keyword set compiles in well under a minute; see benchmarks/bench_reload.py)."""

_reload_seq = 0


async def reload_worker(h: WorkerHandle, rules_dir: str, timeout: float = RELOAD_TIMEOUT_S) -> dict[str, Any]:
    """Tell one worker to compile ``rules_dir`` and swap it in; its answer
    ({ok, version, error}). Main-process side of the ``L``/``A`` frames."""
    global _reload_seq
    _reload_seq += 1
    seq = _reload_seq
    if h.reader is None or h.reader.transport is None or h.reader.transport.is_closing():
        return {"seq": seq, "ok": False, "error": f"worker {h.index} is not running"}
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    h.acks[seq] = fut
    h.reader.transport.write(frame(b"L", json.dumps({"seq": seq, "dir": rules_dir}).encode()))
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        h.acks.pop(seq, None)
        return {"seq": seq, "ok": False, "error": f"worker {h.index} did not answer in {timeout:.0f} s"}


def serve_reloads(proto: _SinkProtocol, sink: ChannelSink, engine_ref: Any, backend: str) -> None:
    """Worker side: answer ``L`` frames by compiling off the loop and swapping ``engine_ref``.

    Queries and transactions read the ref once, so those in flight finish with the
    Engine they started with; the next ones get the new one. Reloads run one at a time.
    """
    lock = asyncio.Lock()
    loop = asyncio.get_running_loop()

    async def reload(seq: int, rules_dir: str) -> None:
        from rules.engine import Engine

        async with lock:
            try:
                engine = await loop.run_in_executor(
                    None, lambda: Engine.from_dir(rules_dir, backend=backend))
            except Exception as e:
                sink.send(b"A", {"seq": seq, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
                return
            engine_ref.swap(engine)
            gc.freeze()  # as at start: keep the new rule set out of the cyclic GC's walks
            sink.send(b"A", {"seq": seq, "ok": True, "version": engine.version})

    def on_frame(kind: bytes, payload: bytes) -> None:
        if kind == b"L":
            msg = json.loads(payload)
            task = loop.create_task(reload(int(msg["seq"]), str(msg["dir"])))
            _tasks.add(task)
            task.add_done_callback(_tasks.discard)

    proto.on_frame = on_frame


_tasks: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, kw_only=True)
class PoolSpec:
    """What every worker process needs, whatever it serves (picklable: sent to a
    spawned interpreter); ``WorkerPool`` and ``_serve`` read only these."""

    rules_dir: str
    backend: str
    bindings: tuple[Binding, ...]
    fail_open: bool
    count: int


@dataclass(frozen=True, kw_only=True)
class WorkerSpec(PoolSpec):
    """A DNS worker: the shim's settings and the upstreams to forward to."""

    dns: DnsConfig
    upstreams: tuple[tuple[str, int], ...]


@dataclass(frozen=True, kw_only=True)
class HttpWorkerSpec(PoolSpec):
    """An HTTP worker: the proxy service's settings."""

    config: HttpServiceConfig


_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_tid = 0
_spawner_users = 0
"""Pools started and not yet stopped: the last one to stop ends the thread."""


def spawner() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that starts worker processes, made at the first call (before
    ``lower_priority``, which leaves it alone) and ended when the last pool stops."""
    global _spawner, _spawner_tid
    if _spawner is None:
        _spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="linewarden-spawn")
        _spawner_tid = _spawner.submit(threading.get_native_id).result()
    return _spawner


def _spawner_done() -> None:
    global _spawner, _spawner_users
    _spawner_users -= 1
    if _spawner_users == 0 and _spawner is not None:
        _spawner.shutdown(wait=True)
        _spawner = None


def lower_priority(by: int) -> int:
    """Every thread of this process ``by`` nicer, but the one that starts worker
    processes (``spawner``), whose children so keep the starting priority; threads made
    later inherit their maker's. Returns the threads changed (Linux: nice is per thread).

    Why: the workers answer and the main process records. On a busy machine they want
    the same cores, and a client waits for the answer, not for the record. Measured on
    the 2-core machine (dnsperf cache hits, one DNS worker, five alternating pairs of
    8 s runs): 156-180k answers/s, median 175k, with the main process 15 nicer,
    against 149-178k, median 156k, at the same priority; p99 latency 1.5-1.75 ms
    against 1.8-2.05. (10 nicer: no clear difference in three pairs.) The store still
    gets every idle moment, and the workers' flow control holds them when it falls
    behind."""
    if by <= 0:
        return 0
    spawner()
    changed = 0
    for t in os.listdir("/proc/self/task"):
        tid = int(t)
        if tid == _spawner_tid:
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
            changed += 1
        except OSError:  # the thread ended meanwhile
            pass
    return changed


class WorkerPool:
    """One service as ``spec.count`` worker processes feeding the one writer.

    Starts them (the later ones joining the port the first one bound when the
    configured port is 0), starts another in place of one that dies (crash, OOM
    kill) so the port keeps answering, and stops them in order: SIGTERM, wait for
    each channel to drain, SIGKILL past ``STOP_TIMEOUT_S``."""

    name = "worker"

    holds_intake = False
    """Whether its workers stop taking work while the main process is behind: only then
    may the main process run nicer than they (``store.nice``, ``lower_priority``)."""

    def __init__(self, spec: PoolSpec, writer: Any, entry: Callable[[Any, int, socket.socket], None]) -> None:
        self.spec = spec
        self.writer = writer
        self.entry = entry
        """The process's entry point (module level: a spawned interpreter imports it)."""
        self.workers: list[WorkerHandle] = []
        self.restarts = 0
        """Workers started again after they died."""
        self._stopping = False
        self._using_spawner = False
        self._restarts: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[Any, ...] | None:
        return None

    def joined(self, spec: Any) -> Any:  # each pool's own spec type
        """``spec`` for the second and later workers once the first has bound its port."""
        return spec

    async def start(self) -> None:
        global _spawner_users
        spec = self.spec
        _spawner_users += 1
        self._using_spawner = True
        try:
            for i in range(spec.count):
                if i == 1:
                    spec = self.joined(spec)
                self.workers.append(await self._spawn(spec, i))
        except BaseException:
            await self.stop()
            raise
        # With the bound port (also when there is one worker): a restarted worker takes the same one.
        self.spec = self.joined(spec) if len(self.workers) == 1 else spec
        log.info("%s: %d worker process(es) on %s", self.name, len(self.workers), self.address)

    async def _spawn(self, spec: PoolSpec, index: int) -> WorkerHandle:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        h = WorkerHandle(index)
        proc = multiprocessing.get_context("spawn").Process(
            target=self.entry, args=(spec, index, child), name=f"linewarden-{self.name}-{index}")
        try:
            # From the thread that keeps the starting priority: a process inherits its
            # parent thread's, and the main process's others may run nicer (lower_priority).
            await loop.run_in_executor(spawner(), proc.start)
        finally:
            child.close()
        h.process = proc
        _, h.reader = await loop.connect_accepted_socket(
            lambda: ChannelReader(self.writer, h, self._lost), parent)
        try:
            await asyncio.wait_for(asyncio.shield(h.ready), START_TIMEOUT_S)
        except BaseException:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGKILL)
            raise
        return h

    def _lost(self, h: WorkerHandle) -> None:
        """A worker's channel closed. During ``stop`` that is the plan; otherwise it died."""
        if self._stopping or h not in self.workers:
            return
        log.error("%s worker %d (pid %s) exited; restarting it", self.name, h.index,
                  h.process.pid if h.process else "?")
        task = asyncio.get_running_loop().create_task(self._restart(h))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, h: WorkerHandle) -> None:
        delay = RESTART_DELAY_S
        loop = asyncio.get_running_loop()
        if h.process is not None:
            await loop.run_in_executor(None, h.process.join, 5)
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                new = await self._spawn(self.spec, h.index)
            except Exception as e:
                log.error("restarting %s worker %d failed: %s", self.name, h.index, e)
                delay = min(delay * 2, RESTART_DELAY_MAX_S)
                continue
            if self._stopping:
                self.workers.append(new)  # stop() is running: let it stop this one too
                return
            self.workers[self.workers.index(h)] = new
            self.restarts += 1
            return

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._restarts):
            task.cancel()
        for h in self.workers:
            if h.process is not None and h.process.is_alive() and h.process.pid:
                os.kill(h.process.pid, signal.SIGTERM)  # our own child, by its pid
        for h in self.workers:
            if h.reader is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(h.reader.closed), STOP_TIMEOUT_S)
                except (asyncio.TimeoutError, TimeoutError):
                    log.error("%s worker %d did not stop in time; killing it", self.name, h.index)
                    if h.process.is_alive() and h.process.pid:
                        os.kill(h.process.pid, signal.SIGKILL)
            if h.process is not None:
                await asyncio.get_running_loop().run_in_executor(None, h.process.join, 5)
        self.workers.clear()
        if self._using_spawner:
            self._using_spawner = False
            _spawner_done()


class DnsWorkers(WorkerPool):
    """The DNS service as ``dns.workers`` processes (``start``/``stop``, like every service)."""

    name = "dns"
    holds_intake = True
    """Its workers stop reading queries while the main process is behind (``_hold_udp``
    in proxy/dns_shim.py), so the main process may run nicer (``store.nice``)."""

    def __init__(self, spec: WorkerSpec, writer: Any) -> None:
        super().__init__(replace(spec, dns=replace(spec.dns, sinkhole=dict(spec.dns.sinkhole))),
                         writer, worker_main)

    @property
    def address(self) -> tuple[Any, ...] | None:
        return self.udp_address

    @property
    def udp_address(self) -> tuple[Any, ...] | None:
        return self.workers[0].udp_address if self.workers else None

    @property
    def tcp_address(self) -> tuple[Any, ...] | None:
        return self.workers[0].tcp_address if self.workers else None

    def joined(self, spec: WorkerSpec) -> WorkerSpec:
        if not spec.dns.listen.endswith(":0"):
            return spec
        host = spec.dns.listen.rsplit(":", 1)[0]
        port = self.workers[0].udp_address[1]  # type: ignore[index]
        return replace(spec, dns=replace(spec.dns, listen=f"{host}:{port}"))


class HttpWorkers(WorkerPool):
    """The HTTP(S) proxy as ``http.workers`` processes, each running its own fast path
    (and its own mitmproxy when interception is on) on the shared port."""

    name = "http"

    def __init__(self, spec: HttpWorkerSpec, writer: Any) -> None:
        super().__init__(spec, writer, http_worker_main)

    @property
    def address(self) -> tuple[str, int] | None:
        addr = self.workers[0].tcp_address if self.workers else None
        return (addr[0], addr[1]) if addr else None

    def joined(self, spec: HttpWorkerSpec) -> HttpWorkerSpec:
        fp = spec.config.fastpath
        if fp.listen[1] != 0:
            return spec
        return replace(spec, config=replace(spec.config, fastpath=replace(fp, listen=self.address)))


async def _until_stopped(stop: asyncio.Event, proto: _SinkProtocol, who: str) -> None:
    """Until SIGTERM (``stop``) or the main process is gone (the channel closed): a
    worker must not outlive the process that writes its records."""
    stopping = asyncio.ensure_future(stop.wait())
    orphaned = asyncio.ensure_future(proto.lost.wait())
    await asyncio.wait([stopping, orphaned], return_when=asyncio.FIRST_COMPLETED)
    if proto.lost.is_set():
        log.error("main process gone: %s stops", who)
    stopping.cancel()
    orphaned.cancel()


class Served(NamedTuple):
    """A service running in a worker: how to stop it and what to tell the main process."""

    stop: Callable[[], Awaitable[None]]
    hello: dict[str, Any]
    """Bound addresses for the ``H`` frame: ``udp`` and ``tcp``."""
    stats: Callable[[], dict[str, Any]]
    """The service's counters for the ``S`` frame at exit."""


StartService = Callable[[Any, int, Any, ChannelSink], Awaitable[Served]]
"""(spec, index, EngineRef, sink) -> the started service."""


def _process_main(kind: str, start: StartService, spec: PoolSpec, index: int, chan: socket.socket) -> None:
    import uvloop

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {kind}-{index} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when we stop
    uvloop.run(_serve(kind, start, spec, index, chan))


async def _serve(kind: str, start: StartService, spec: PoolSpec, index: int, chan: socket.socket) -> None:
    """A worker's life: compile the rules, start the service, report, serve reloads
    until SIGTERM (or the main process is gone), then stop and flush every record."""
    from proxy.dns_shim import EngineRef
    from rules.engine import Engine

    loop = asyncio.get_running_loop()
    transport, proto = await loop.connect_accepted_socket(_SinkProtocol, chan)
    sink = ChannelSink(transport, spec.fail_open)  # type: ignore[arg-type]
    try:
        engine_ref = EngineRef(Engine.from_dir(spec.rules_dir, backend=spec.backend))
        served = await start(spec, index, engine_ref, sink)
    except Exception as e:
        sink.send(b"E", f"{type(e).__name__}: {e}")
        transport.close()
        return
    freeze_long_lived()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Reloads come from the main process over the channel (it validates first);
    # a SIGHUP to the process group must not stop a worker.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    serve_reloads(proto, sink, engine_ref, spec.backend)
    sink.send(b"H", {"pid": os.getpid()} | served.hello)
    await _until_stopped(stop, proto, f"{kind} worker {index}")
    await served.stop()
    sink.flush()
    sink.send(b"S", served.stats() | {"dropped": sink.dropped, "refused": sink.refused, "sent": sink.sent})
    await proto.drained.wait()
    transport.close()
    await asyncio.sleep(0)


async def _start_dns(spec: WorkerSpec, index: int, engine_ref: Any, sink: ChannelSink) -> Served:
    from proxy.dns_shim import DnsShim

    shim = DnsShim(spec.dns, engine_ref, sink, Identity(spec.bindings),
                   upstreams=list(spec.upstreams), reuse_port=spec.count > 1,
                   uid_prefix=f"D{os.getpid():x}.")
    await shim.start()
    if spec.count > 1 and index == spec.count - 1 and shim.udp_sock is not None:
        attach_random_reuseport(shim.udp_sock, spec.count)
    return Served(shim.stop, {"udp": list(shim.udp_address or ()), "tcp": list(shim.tcp_address or ())},
                  lambda: dict(shim.stats))


async def _start_http(spec: HttpWorkerSpec, index: int, engine_ref: Any, sink: ChannelSink) -> Served:
    from proxy.http_service import HttpProxyService

    cfg = spec.config
    if spec.count > 1:
        cfg = replace(cfg, fastpath=replace(cfg.fastpath, reuse_port=True))
    svc = HttpProxyService(engine_ref, sink.submit, cfg, identity=Identity(spec.bindings))  # type: ignore[arg-type]
    await svc.start()

    def stats() -> dict[str, Any]:
        return {"connections": svc.fastpath.stats.connections if svc.fastpath else 0}

    return Served(svc.stop, {"udp": [], "tcp": list(svc.address or ())}, stats)


def worker_main(spec: WorkerSpec, index: int, chan: socket.socket) -> None:
    """Entry point of a DNS worker process."""
    _process_main("dns", _start_dns, spec, index, chan)


def http_worker_main(spec: HttpWorkerSpec, index: int, chan: socket.socket) -> None:
    """Entry point of an HTTP worker process."""
    _process_main("http", _start_http, spec, index, chan)
