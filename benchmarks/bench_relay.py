#!/usr/bin/env python3
"""Where a relayed byte is paid for: proxy/relay.py splicing against copying.

Issue 4's TLS bulk figure runs client, origin and proxy on one 2-core machine,
so it charges the receiver's cost too. This isolates the parts: a sender
process writes ``--gb`` over loopback to the relay (``proxy.relay``'s
``splice``/``spliced`` on uvloop, as the fast path runs them, in ``--modes``),
which passes it to a receiver process that reads it in 16 KiB ``recv`` calls
(a TLS client reads one record at a time). It prints the CPU seconds per GB of
the relay, the receiver and the sender (each its own ``getrusage``) and their
sum, and the throughput: the median of ``--runs`` alternating runs. On one
machine the throughput follows the sum; on a gateway the receiver and the
sender are other hosts and only the relay's share is the proxy's.
Loopback only; every run is bounded by the byte count.

Usage: ``.venv/bin/python benchmarks/bench_relay.py [--gb 2] [--runs 3] [--modes splice,copy]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.relay import RELAY_MODES, RelayMode, Side, splice, spliced  # noqa: E402

CHUNK = 256 * 1024
"""The sender's write size."""
RECV = 16 * 1024 + 5
"""The receiver's read size: one TLS record (16 KiB) and a header, as a TLS client reads."""


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fork_receiver(lst: socket.socket, report: int) -> int:
    """A child that reads until EOF and writes its CPU seconds to ``report``."""
    pid = os.fork()
    if pid == 0:
        conn, _ = lst.accept()
        buf = bytearray(RECV)
        start = cpu_seconds()
        while conn.recv_into(buf):
            pass
        os.write(report, f"{cpu_seconds() - start}\n".encode())
        os._exit(0)
    return pid


def fork_sender(port: int, total: int, report: int) -> int:
    pid = os.fork()
    if pid == 0:
        s = socket.create_connection(("127.0.0.1", port))
        data, sent = b"x" * CHUNK, 0
        start = cpu_seconds()
        while sent < total:
            sent += s.send(data)
        s.close()
        os.write(report, f"{cpu_seconds() - start}\n".encode())
        os._exit(0)
    return pid


async def relay(mode: RelayMode, lst: socket.socket, rx: tuple[str, int]) -> None:
    """Accept the sender on ``lst``, connect to the receiver at ``rx``, relay until both ended."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Side] = loop.create_future()

    class Accepted(Side):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            accepted.set_result(self)

    server = await loop.create_server(Accepted, sock=lst)
    _, b = await loop.create_connection(Side, *rx)
    a = await accepted
    splice(a, b, mode, after=0)  # the socket relay from the first byte: what is measured
    await spliced(a, b)
    server.close()


def run(mode: RelayMode, total: int) -> tuple[float, float, float, float]:
    """(relay, receiver, sender CPU s/GB, wall s) of one transfer of ``total`` bytes.
    The children are forked before the relay's loop starts (no fork from a running loop)."""
    import uvloop

    rx, lst = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    rx_report, tx_report = os.pipe(), os.pipe()
    pids = [fork_receiver(rx, rx_report[1]), fork_sender(lst.getsockname()[1], total, tx_report[1])]
    started, cpu0 = time.perf_counter(), cpu_seconds()
    uvloop.run(relay(mode, lst, rx.getsockname()))
    relay_cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - started
    for pid in pids:
        os.waitpid(pid, 0)
    receiver_cpu, sender_cpu = (float(os.read(r, 64)) for r, _ in (rx_report, tx_report))
    for fd in (*rx_report, *tx_report):
        os.close(fd)
    rx.close()
    gb = total / 1e9
    return relay_cpu / gb, receiver_cpu / gb, sender_cpu / gb, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="bytes per transfer, in GB (default 2)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per relay (default 3)")
    ap.add_argument("--modes", default="splice,copy", help="relay modes to compare (default splice,copy)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m in RELAY_MODES]
    total = int(args.gb * 1e9)
    results: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for mode in modes:
            results[mode].append(run(mode, total))  # type: ignore[arg-type]
    print(f"relay of {args.gb:g} GB over loopback through proxy/relay.py, median of {args.runs} "
          f"alternating runs (load average {os.getloadavg()[0]:.2f})")
    for mode, rows in results.items():
        relay, receiver, sender, wall = (statistics.median(c) for c in zip(*rows))
        print(f"  {mode:6s}  relay {relay:.3f}  receiver {receiver:.3f}  sender {sender:.3f}  "
              f"sum {relay + receiver + sender:.3f} s/GB   {args.gb / wall:.2f} GB/s")


if __name__ == "__main__":
    main()
