#!/usr/bin/env python3
"""Where a relayed byte is paid for: a splice(2) relay against a copying relay.

Issue 4's TLS bulk figure runs client, origin and proxy on one 2-core machine,
so it charges the receiver's cost too. This isolates the two halves: a sender
process writes ``--gb`` over loopback to a relay, which passes it to a receiver
process, once with ``os.splice`` (socket -> pipe -> socket, as
``proxy/relay.py`` does) and once with ``recv_into``/``sendall`` through a
256 KiB buffer (what a copying relay does). It prints the CPU seconds per GB of
the relay and of the receiver (their own ``getrusage``), median of ``--runs``
alternating runs. Loopback only; every run is bounded by the byte count.

Usage: ``.venv/bin/python benchmarks/bench_relay.py [--gb 2] [--runs 3]``
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import socket
import statistics
import time

CHUNK = 256 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def fork_receiver(lst: socket.socket, report: int) -> int:
    """A child that reads until EOF and writes its CPU seconds to ``report``."""
    pid = os.fork()
    if pid == 0:
        conn, _ = lst.accept()
        buf = bytearray(65536)
        start = cpu_seconds()
        while conn.recv_into(buf):
            pass
        os.write(report, f"{cpu_seconds() - start}".encode())
        os._exit(0)
    return pid


def fork_sender(port: int, total: int) -> int:
    pid = os.fork()
    if pid == 0:
        s = socket.create_connection(("127.0.0.1", port))
        data, sent = b"x" * CHUNK, 0
        while sent < total:
            sent += s.send(data)
        s.close()
        os._exit(0)
    return pid


def relay_splice(a: socket.socket, b: socket.socket) -> None:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
        while n := os.splice(a.fileno(), w, CHUNK):
            while n:
                n -= os.splice(r, b.fileno(), n)
    finally:
        os.close(r)
        os.close(w)


def relay_copy(a: socket.socket, b: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := a.recv_into(buf):
        b.sendall(view[:n])


def run(mode: str, total: int) -> tuple[float, float, float]:
    """(relay CPU s/GB, receiver CPU s/GB, wall s) of one transfer of ``total`` bytes."""
    rx, src = listener(), listener()
    rfd, wfd = os.pipe()
    pids = [fork_receiver(rx, wfd), fork_sender(src.getsockname()[1], total)]
    a, _ = src.accept()
    b = socket.create_connection(rx.getsockname())
    started, cpu0 = time.perf_counter(), cpu_seconds()
    (relay_splice if mode == "splice" else relay_copy)(a, b)
    b.close()
    relay_cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - started
    for pid in pids:
        os.waitpid(pid, 0)
    receiver_cpu = float(os.read(rfd, 64))
    for fd in (rfd, wfd):
        os.close(fd)
    for s in (a, rx, src):
        s.close()
    gb = total / 1e9
    return relay_cpu / gb, receiver_cpu / gb, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="bytes per transfer, in GB (default 2)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per relay (default 3)")
    args = ap.parse_args()
    total = int(args.gb * 1e9)
    results: dict[str, list[tuple[float, float, float]]] = {"splice": [], "copy": []}
    for _ in range(args.runs):
        for mode in results:
            results[mode].append(run(mode, total))
    print(f"relay of {args.gb:g} GB over loopback, median of {args.runs} alternating runs "
          f"(load average {os.getloadavg()[0]:.2f})")
    for mode, rows in results.items():
        relay, receiver, wall = (statistics.median(c) for c in zip(*rows))
        print(f"  {mode:6s}  relay {relay:.3f} s/GB   receiver {receiver:.3f} s/GB   "
              f"sum {relay + receiver:.3f} s/GB   {args.gb / wall:.2f} GB/s")


if __name__ == "__main__":
    main()
