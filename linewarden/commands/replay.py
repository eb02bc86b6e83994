"""`linewarden replay`: run recorded captures through the Engine (the offline adapter).

Reads pcap/pcapng files (proxy/pcap.py), drives proxy/replay.py, and either prints
one JSON object a line per decision on stdout or, with ``--store``, writes the
decisions (and a conn record per connection) into an audit store as a forensic
import. Keeps composition only: no parsing or deciding here.

Exit status:
  0  every capture was read to its end;
  1  a capture was damaged or unreadable (truncated, unknown linktype, not a
     capture): the error is on stderr, the decisions made before the damage
     were printed/stored, and the remaining files were still replayed;
  2  usage error, or the rule set is invalid;
  3  the store could not be written.
A worker process that fails (``--jobs``) is reported like a damaged capture (1).

Parallel by default: on a capture of ``PARALLEL_MIN_BYTES`` or more, one worker
process per CPU decides a share of the flows (proxy/replay.py, "Parallel replay")
and the parent merges their outputs into exactly the order a single process
gives (proxy/replay.py, "Output order"), so the output does not depend on
``--jobs``. ``--jobs 1`` keeps the replay on one core (say, on a gateway whose
other core serves live traffic).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import os
import queue
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

EXIT_OK = 0
EXIT_BAD_CAPTURE = 1
EXIT_USAGE = 2
EXIT_STORE = 3

PROGRESS_EVERY_S = 0.2
"""Redraw interval of the progress bar (stderr, only on a terminal)."""

BATCH_ITEMS = 512
"""Items a worker process sends to the parent at a time (amortises the pipe)."""

MARK_EVERY = 8192
"""Packets between a worker's progress marks (``--jobs``): how far the parent can
merge the workers' outputs without waiting for a worker with nothing to say."""

FINISH_INDEX = 1 << 62
"""Packet number given to the outputs of the end of the capture (after every packet)."""

PARALLEL_MIN_BYTES = 16 << 20
"""Below this much capture the default (``--jobs 0``) replays in this process:
starting workers and merging their outputs costs ~0.1-0.2 s, about what one
process takes for a few MB."""

QUEUE_BATCHES_PER_JOB = 8
"""Bound of the worker → parent queue, in batches per worker: workers wait
(back-pressure) rather than buffer without limit when the output is slow."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "replay",
        help="replay pcap/pcapng captures through a rule set",
        description="Replay recorded traffic (pcap or pcapng; Ethernet, VLAN, Linux cooked, raw IP; "
        "IPv4/IPv6) through the same decisions as the live path: HTTP/1.x transactions, TLS "
        "ClientHello SNI, DNS over UDP and TCP. Prints one JSON object per decision, or writes "
        "records into an audit store with --store.",
        epilog="exit status: 0 all captures read; 1 a capture was damaged (decisions before the "
        "damage kept, other files still replayed); 2 usage or rule-set error; 3 store error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rules", type=Path, help="rule-set directory (default: the bundled sample rules)")
    p.add_argument("--store", type=Path, metavar="DIR",
                   help="write records into this audit store (forensic import) instead of printing JSON")
    p.add_argument("--backend", default="auto", choices=("auto", "hyperscan", "aho"),
                   help="keyword matcher backend (default: auto = hyperscan when installed)")
    p.add_argument("--jobs", type=int, default=0, metavar="N",
                   help="worker processes, each deciding a share of the flows (default 0: one per CPU this "
                   "process may use, or none for captures under 16 MiB; 1: this process only). The output "
                   "is the same, line for line, whatever N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="pcap or pcapng files, replayed in order")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linewarden.cli import load_engine

    if args.jobs < 0:
        print("linewarden replay: --jobs must be 0 (one per CPU) or more", file=sys.stderr)
        return EXIT_USAGE
    engine = load_engine(args.rules, args.backend, "linewarden replay")
    if engine is None:
        return EXIT_USAGE
    jobs = args.jobs or default_jobs(args.files)
    session = _Session(engine, args.files, want_conns=args.store is not None,
                       progress=not args.no_progress and sys.stderr.isatty(), jobs=jobs)
    if args.store is None:
        _write_lines(session.items(_json_line), sys.stdout.buffer)
        status = session.status
    else:
        status = _store(session, args.store)
    session.summary(sys.stderr)
    return status


def default_jobs(files: list[Path]) -> int:
    """``--jobs 0``: one worker per CPU this process may run on (its affinity mask,
    which containers and ``taskset`` narrow), none for small captures."""
    if sum(_size(p) for p in files) < PARALLEL_MIN_BYTES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cpus or 1)


def _json_line(output: Any) -> bytes | None:
    from proxy.replay import Decision

    if not isinstance(output, Decision):
        return None
    return _encoder()(output.to_json()) + b"\n"


def _record(output: Any) -> Any:
    from proxy.replay import to_record

    return to_record(output)


@functools.cache
def _encoder() -> Callable[[Any], bytes]:
    import msgspec

    return msgspec.json.Encoder().encode


def _write_lines(lines: Iterator[bytes], out: IO[bytes]) -> None:
    for line in lines:
        out.write(line)
    out.flush()


def _store(session: _Session, store_dir: Path) -> int:
    try:
        from storage.config import StoreConfig
        from storage.writer import write_records
    except ImportError as exc:
        print(f"linewarden replay: --store needs the audit store ({exc})", file=sys.stderr)
        return EXIT_STORE
    try:
        write_records(store_dir, session.items(_record), StoreConfig(forensic=True))
    except Exception as exc:  # the edge: any store failure is reported once, with its cause
        print(f"linewarden replay: cannot write the store at {store_dir}: {exc}", file=sys.stderr)
        return EXIT_STORE
    return session.status


class _Session:
    """The files of one invocation, replayed as one continuous capture (rotated
    tcpdump files continue each other's connections), in this process or in
    ``jobs`` worker processes that each decide a share of the flows."""

    def __init__(self, engine: Any, files: list[Path], *, want_conns: bool, progress: bool, jobs: int = 1) -> None:
        from proxy.pcap import CaptureStats
        from proxy.replay import ReplayStats

        self.engine = engine
        self.files = files
        self.want_conns = want_conns
        self.jobs = jobs
        self.capture = CaptureStats()
        self.stats = ReplayStats()
        self.progress = progress
        self.status = EXIT_OK
        self.total = sum(_size(p) for p in files)
        self.file_bytes = 0
        self.started = time.monotonic()
        self.elapsed = 0.0

    def items(self, convert: Callable[[Any], Any]) -> Iterator[Any]:
        """Every output converted (None results dropped). Worker processes are
        started here, at once: before the caller (the store writer) starts threads,
        since forking a process with threads can deadlock the child."""
        source = self._serial(convert) if self.jobs == 1 else self._collect(*self._spawn(convert))
        return self._ending(source)

    def _ending(self, source: Iterator[Any]) -> Iterator[Any]:
        yield from source
        self._clear()
        self.elapsed = time.monotonic() - self.started

    # -- one process -------------------------------------------------------

    def _serial(self, convert: Callable[[Any], Any]) -> Iterator[Any]:
        from proxy.replay import Replay

        # JSON lines carry neither uid nor Community ID: only records need them.
        replay = Replay(self.engine, want_conns=self.want_conns, flow_ids=self.want_conns)
        self.stats = replay.stats
        for _, item in _replay_files(replay, self.files, self.capture, self._error,
                                     self._draw if self.progress else None):
            if item is None:
                continue
            converted = convert(item)
            if converted is not None:
                yield converted
        self.file_bytes = self.total

    def _error(self, message: str) -> None:
        self._clear()
        print(f"linewarden replay: {message}", file=sys.stderr)
        self.status = EXIT_BAD_CAPTURE

    # -- worker processes --------------------------------------------------

    def _spawn(self, convert: Callable[[Any], Any]) -> tuple[list[Any], Any]:
        import multiprocessing

        # fork: the workers inherit the compiled Engine instead of compiling it again.
        ctx = multiprocessing.get_context("fork")
        q: Any = ctx.Queue(maxsize=QUEUE_BATCHES_PER_JOB * self.jobs)
        procs = [
            ctx.Process(target=_worker, args=(k, self.jobs, self.engine, self.files, self.want_conns, convert, q,
                                              k == 0 and self.progress), daemon=True)
            for k in range(self.jobs)
        ]
        for p in procs:
            p.start()
        return procs, q

    def _collect(self, procs: list[Any], q: Any) -> Iterator[Any]:
        """The workers' outputs merged into the single-process order (proxy/replay.py,
        "Output order"): by the packet that completed each (every worker reads every
        packet, so packet numbers are shared), then its phase and flow order, then
        shard, then the worker's own order. An item is released once every worker
        has reported progress past its packet (the watermarks)."""
        finished = 0
        pending: list[deque[tuple[Any, ...]]] = [deque() for _ in procs]
        marks = [-1] * len(procs)
        try:
            while finished < self.jobs:
                try:
                    kind, payload = q.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        self._error(f"a worker process died (exit status {dead[0].exitcode})")
                        break
                    continue
                if kind == "items":
                    shard, batch, mark = payload
                    pending[shard].extend(batch)
                    marks[shard] = mark
                    yield from _release(pending, min(marks))
                elif kind == "error":
                    self._error(payload)
                elif kind == "progress":
                    self._draw(payload[0], payload[1], payload[2])
                elif kind == "done":
                    finished += 1
                    self._merge(*payload)
        finally:
            for p in procs:
                if p.is_alive() and finished < self.jobs:
                    p.terminate()
                p.join()
        yield from _release(pending, FINISH_INDEX)  # a worker that died leaves its last items
        self.file_bytes = self.total

    def _merge(self, shard: int, stats: dict[str, int], capture: dict[str, Any] | None) -> None:
        for name, value in stats.items():
            setattr(self.stats, name, getattr(self.stats, name) + value)
        if capture is not None:
            for name, value in capture.items():
                setattr(self.capture, name, value)

    # -- output ------------------------------------------------------------

    def _draw(self, name: str, pos: int, decisions: int) -> None:
        width = 30
        frac = min(1.0, pos / self.total) if self.total else 1.0
        bar = "#" * int(frac * width)
        rate = pos / max(1e-9, time.monotonic() - self.started) / 1e6
        sys.stderr.write(f"\r[{bar:<{width}}] {frac:6.1%} {rate:7.1f} MB/s  {decisions} decisions  {name[:30]}")
        sys.stderr.flush()

    def _clear(self) -> None:
        if self.progress:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()

    def summary(self, err: IO[str]) -> None:
        s, c = self.stats, self.capture
        secs = self.elapsed or (time.monotonic() - self.started)
        mbps = self.file_bytes / 1e6 / secs if secs > 0 else 0.0
        line = (f"replay: {c.records} packets, {self.file_bytes} bytes, {s.flows} flows, {s.decisions} decisions "
                f"({s.blocked} block) in {secs:.2f} s, {mbps:.1f} MB/s")
        if self.jobs > 1:
            line += f" ({self.jobs} jobs)"
        notes = []
        if c.skipped:
            notes.append("skipped " + ", ".join(f"{k} {v}" for k, v in sorted(c.skipped.items())))
        if c.warnings:
            notes.append("warnings " + ", ".join(f"{k} {v}" for k, v in sorted(c.warnings.items())))
        for name in ("dns_malformed", "http_errors", "tls_errors", "gaps", "evicted_flows"):
            if getattr(s, name):
                notes.append(f"{name.replace('_', ' ')} {getattr(s, name)}")
        if s.gap_bytes:
            notes.append(f"missing bytes {s.gap_bytes}")
        print(line + (f"; {'; '.join(notes)}" if notes else ""), file=err)


def _release(pending: list[deque[tuple[Any, ...]]], limit: int) -> Iterator[Any]:
    """Items of every shard up to packet ``limit``, merged by their keys (``_worker``)."""
    ready = []
    for d in pending:
        take = []
        while d and d[0][0] <= limit:
            take.append(d.popleft())
        ready.append(take)
    for key in heapq.merge(*ready):
        yield key[-1]


def _replay_files(replay: Any, files: list[Path], capture: Any, error: Callable[[str], None],
                  draw: Callable[[str, int, int], None] | None) -> Iterator[tuple[int, Any]]:
    """``(packet number, output)`` for every output of ``files`` through ``replay``,
    and ``(packet number, None)`` every ``MARK_EVERY`` packets (a watermark: all
    outputs up to that packet were yielded). Damaged files are reported to
    ``error`` (the decisions before the damage were already yielded) and skipped."""
    from proxy.pcap import CaptureError, read_packets

    done = 0
    number = 0
    for path in files:
        try:
            f = open(path, "rb")
        except OSError as exc:
            error(f"{path}: cannot open: {exc.strerror or exc}")
            continue
        with f:
            try:
                next_draw = 0.0
                base = capture.bytes + 16 * capture.records
                for n, pkt in enumerate(read_packets(f, capture)):
                    number += 1
                    for item in replay.packet(pkt):
                        yield number, item
                    if not number % MARK_EVERY:
                        yield number, None
                    if draw is not None and not n & 1023 and time.monotonic() >= next_draw:
                        next_draw = time.monotonic() + PROGRESS_EVERY_S
                        # Bytes consumed so far (record headers + data); the file's own
                        # position runs ahead by the read window.
                        pos = capture.bytes + 16 * capture.records - base
                        draw(path.name, done + pos, replay.stats.decisions)
            except CaptureError as exc:
                error(f"{path}: {exc} (decisions before it were kept)")
        done += _size(path)
    for item in replay.finish():
        yield FINISH_INDEX, item


def _worker(shard: int, jobs: int, engine: Any, files: list[Path], want_conns: bool,
            convert: Callable[[Any], Any], q: Any, progress: bool) -> None:
    """One worker process: the whole capture, deciding only its share of the flows.
    Shard 0 reports capture errors, progress and the capture statistics.

    Each converted item goes to the parent with its ``OrderKeys`` key: its place
    in the single-process order."""
    from proxy.pcap import CaptureStats
    from proxy.replay import OrderKeys, Replay

    def error(message: str) -> None:
        if shard == 0:
            q.put(("error", message))

    def draw(name: str, pos: int, decisions: int) -> None:
        q.put(("progress", (name, pos, decisions * jobs)))

    try:
        replay = Replay(engine, want_conns=want_conns, shard=(shard, jobs), order_marks=True, flow_ids=want_conns)
        capture = CaptureStats()
        batch: list[tuple[Any, ...]] = []
        keys = OrderKeys(shard)
        for number, item in _replay_files(replay, files, capture, error, draw if progress else None):
            if item is None:  # watermark: everything up to this packet is in the batch
                q.put(("items", (shard, batch, number)))
                batch = []
                continue
            key = keys.key(number, item)
            if key is None:
                continue
            converted = convert(item)
            if converted is not None:
                batch.append((*key, converted))
                if len(batch) >= BATCH_ITEMS:
                    # More outputs of this same packet may follow: mark the one before.
                    q.put(("items", (shard, batch, number - 1)))
                    batch = []
        q.put(("items", (shard, batch, FINISH_INDEX)))
        stats = dataclasses.asdict(replay.stats)
        cap = dataclasses.asdict(capture) if shard == 0 else None
        q.put(("done", (shard, stats, cap)))
    except BaseException:
        q.put(("error", f"worker {shard} failed: {traceback.format_exc(limit=5)}"))
        raise


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
