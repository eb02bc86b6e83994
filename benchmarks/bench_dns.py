#!/usr/bin/env python3
"""DNS benchmark: linewarden's shim against dnsmasq and unbound, in one run.

Every resolver under test gets the same 100k-domain blocklist and forwards to
the same loopback upstream: a dnsmasq authoritative for ``bench.lw.test`` only
(``address=/bench.lw.test/…`` answers every name under it, ``no-resolv`` and no
``server=`` lines: it never recurses, everything else is REFUSED). Nothing
leaves loopback.

Workloads (dnsperf, 1 thread, 4 clients, each run bounded by ``--seconds``):

* cache-hit: 1,000 names of the zone plus 100 blocklisted names, warmed once,
  then looped;
* cache-miss: fresh unique names, each asked once (``-n 1``).

Latency percentiles come from dnsperf's ``-v`` per-query lines (it prints only
the average itself). linewarden records every query: after its runs the store
is counted and the count printed next to the queries it answered.

Usage: ``.venv/bin/python benchmarks/bench_dns.py [--seconds 10] [--workers 2]``
(needs dnsperf, dnsmasq and unbound: ``apt-get install dnsperf dnsmasq unbound``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
ZONE = "bench.lw.test"
ANSWER = "192.0.2.1"
BLOCKLIST_SIZE = 100_000
HIT_NAMES = 1_000
HIT_BLOCKED = 100
CLIENTS = 4


@dataclass
class Result:
    server: str
    workload: str
    qps: float
    p50_ms: float
    p99_ms: float
    completed: int
    lost: int


def free_port() -> int:
    """A port free for both UDP and TCP on loopback."""
    for _ in range(100):
        t = socket.socket()
        t.bind((HOST, 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind((HOST, port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    raise RuntimeError("no free port")


def blocklist(seed: int = 5) -> list[str]:
    rnd = random.Random(seed)
    return [f"b{i}-{rnd.getrandbits(40):010x}.blocked.example" for i in range(BLOCKLIST_SIZE)]


def wait_dns(port: int, timeout: float = 60.0) -> None:
    """Until the server on ``port`` answers a query (any rcode)."""
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x05bench\x02lw\x04test\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        try:
            s.sendto(q, (HOST, port))
            if s.recv(4096)[:2] == q[:2]:
                return
        except OSError:
            pass
        finally:
            s.close()
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers on {HOST}:{port}")


class Procs:
    """Processes this benchmark started; stopped by their own pid only."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path, **kw) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 60) -> int:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                return p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
        return p.wait()

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                self.stop(p, 30)


def upstream_conf(d: Path, port: int) -> Path:
    conf = d / "upstream.conf"
    conf.write_text(f"""port={port}
listen-address={HOST}
bind-interfaces
no-resolv
no-hosts
no-poll
user=root
cache-size=0
local-ttl=3600
local=/lw.test/
address=/{ZONE}/{ANSWER}
""")
    return conf


def dnsmasq_conf(d: Path, port: int, up: int, blocked: list[str]) -> Path:
    conf = d / "dnsmasq.conf"
    lines = [f"port={port}", f"listen-address={HOST}", "bind-interfaces", "no-resolv",
             "no-hosts", "no-poll", "user=root", f"server={HOST}#{up}", "cache-size=10000"]
    lines += [f"address=/{name}/" for name in blocked]  # no address: NXDOMAIN
    conf.write_text("\n".join(lines) + "\n")
    return conf


def unbound_conf(d: Path, port: int, up: int, blocked: list[str], threads: int) -> Path:
    conf = d / f"unbound-{threads}.conf"
    body = [
        "server:",
        f"  interface: {HOST}", f"  port: {port}", f"  num-threads: {threads}",
        "  username: \"\"", "  chroot: \"\"", f"  directory: \"{d}\"", "  pidfile: \"\"",
        "  use-syslog: no", f"  logfile: \"{d}/unbound-{threads}.log\"", "  verbosity: 0",
        "  do-not-query-localhost: no", "  module-config: \"iterator\"",
        "  access-control: 127.0.0.0/8 allow", "  local-zone: \"test.\" nodefault",
        "  domain-insecure: \"lw.test.\"", "  qname-minimisation: no",
        "  so-reuseport: yes",
    ]
    body += [f"  local-zone: \"{name}.\" always_nxdomain" for name in blocked]
    body += ["forward-zone:", "  name: \".\"", f"  forward-addr: {HOST}@{up}"]
    conf.write_text("\n".join(body) + "\n")
    return conf


def linewarden_conf(d: Path, port: int, up: int, blocked: list[str], workers: int) -> Path:
    rules = d / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "ruleset.toml").write_text('name = "bench"\nversion = 1\n\n[categories.bench]\naction = "block"\n')
    (rules / "domains.tsv").write_text(
        "id\tcategory\tdomain\n" + "".join(f"B{i}\tbench\t{n}\n" for i, n in enumerate(blocked)))
    conf = d / "linewarden.toml"
    conf.write_text(f"""[rules]
dir = "{rules}"
[store]
dir = "{d / 'store'}"
[http]
enabled = false
[dns]
listen = "{HOST}:{port}"
upstreams = ["{HOST}:{up}"]
workers = {workers}
""")
    return conf


def dnsperf(port: int, data: Path, seconds: int, once: bool, log: Path) -> Result:
    args = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(data), "-c", str(CLIENTS),
            "-T", "1", "-l", str(seconds), "-t", "2", "-v"]
    if once:
        args += ["-n", "1"]
    with open(log, "wb") as out:
        subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=True,
                       timeout=seconds + 60)
    lat: list[float] = []
    qps = 0.0
    completed = lost = 0
    with open(log, "rb") as f:
        for line in f:
            if line.startswith(b"> "):
                lat.append(float(line.rsplit(b" ", 1)[1]))
            elif b"Queries per second:" in line:
                qps = float(line.split(b":")[1])
            elif b"Queries completed:" in line:
                completed = int(line.split(b":")[1].split()[0])
            elif b"Queries lost:" in line:
                lost = int(line.split(b":")[1].split()[0])
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return Result("", "", qps, pct(0.50), pct(0.99), completed, lost)


def count_dns_records(store: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from storage.query import query

    return sum(1 for _ in query(store, kind="dns"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="length of each dnsperf run")
    ap.add_argument("--workers", type=int, default=2, help="linewarden dns.workers")
    ap.add_argument("--miss-names", type=int, default=600_000,
                    help="unique names per cache-miss run (more than any server answers in --seconds)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--only", nargs="*", default=[], help="subset of servers to run")
    args = ap.parse_args()
    for tool in ("dnsperf", "dnsmasq", "unbound"):
        if shutil.which(tool) is None:
            print(f"bench_dns: {tool} is not installed (apt-get install dnsperf dnsmasq unbound)",
                  file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="lw-bench-dns-"))
    procs = Procs()
    results: list[Result] = []
    recorded: dict[str, tuple[int, int]] = {}
    try:
        blocked = blocklist()
        rnd = random.Random(11)
        hit = work / "hit.txt"
        names = [f"h{i}.{ZONE} A" for i in range(HIT_NAMES)]
        names += [f"{n} A" for n in rnd.sample(blocked, HIT_BLOCKED)]
        rnd.shuffle(names)
        hit.write_text("\n".join(names) + "\n")

        up = free_port()
        procs.start(["dnsmasq", "--keep-in-foreground", f"--conf-file={upstream_conf(work, up)}",
                     "--pid-file="], work / "upstream.log")
        wait_dns(up)
        servers: list[tuple[str, list[str], dict]] = []
        p_lw, p_dm, p_ub, p_ub2 = free_port(), free_port(), free_port(), free_port()
        servers.append(("upstream", [], {"port": up}))
        servers.append(("linewarden", [sys.executable, "-m", "linewarden", "run", "--config",
                                       str(linewarden_conf(work, p_lw, up, blocked, args.workers))],
                        {"port": p_lw, "cwd": ROOT}))
        servers.append(("dnsmasq", ["dnsmasq", "--keep-in-foreground", "--pid-file=",
                                    f"--conf-file={dnsmasq_conf(work, p_dm, up, blocked)}"], {"port": p_dm}))
        servers.append(("unbound", ["unbound", "-d", "-c", str(unbound_conf(work, p_ub, up, blocked, 1))],
                        {"port": p_ub}))
        servers.append(("unbound-2t", ["unbound", "-d", "-c", str(unbound_conf(work, p_ub2, up, blocked, 2))],
                        {"port": p_ub2}))
        if args.only:
            servers = [s for s in servers if s[0] in args.only]
        for name, cmd, opts in servers:
            port = opts["port"]
            p = None
            if cmd:
                p = procs.start(cmd, work / f"{name}.log", cwd=opts.get("cwd"))
                wait_dns(port, timeout=180)
            # Warm the cache, then the cache-hit run.
            dnsperf(port, hit, 5, True, work / f"{name}-warm.txt")
            r = dnsperf(port, hit, args.seconds, False, work / f"{name}-hit.txt")
            r.server, r.workload = name, "cache-hit"
            results.append(r)
            print(f"{name:11s} cache-hit  {r.qps:9.0f} qps  p50 {r.p50_ms:6.3f} ms  "
                  f"p99 {r.p99_ms:6.3f} ms  lost {r.lost}", flush=True)
            miss = work / f"miss-{name}.txt"
            tag = f"{name.replace('-', '')}{rnd.getrandbits(24):06x}"
            miss.write_text("".join(f"m{i}.{tag}.{ZONE} A\n" for i in range(args.miss_names)))
            r = dnsperf(port, miss, args.seconds, True, work / f"{name}-miss.txt")
            r.server, r.workload = name, "cache-miss"
            results.append(r)
            print(f"{name:11s} cache-miss {r.qps:9.0f} qps  p50 {r.p50_ms:6.3f} ms  "
                  f"p99 {r.p99_ms:6.3f} ms  lost {r.lost}", flush=True)
            if p is not None:
                rc = procs.stop(p, 120)
                if name == "linewarden":
                    asked = sum(x.completed + x.lost for x in results if x.server == name)
                    warm = HIT_NAMES + HIT_BLOCKED
                    recorded[name] = (count_dns_records(work / "store"), asked + warm + 1)
                    if rc != 0:
                        print(f"linewarden exited {rc}; see {work}/linewarden.log", file=sys.stderr)
        report(results, recorded)
    finally:
        procs.stop_all()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: list[Result], recorded: dict[str, tuple[int, int]]) -> None:
    print()
    print(f"{'server':11s} {'workload':10s} {'qps':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in results:
        print(f"{r.server:11s} {r.workload:10s} {r.qps:9.0f} {r.p50_ms:8.3f} {r.p99_ms:8.3f}")
    by = {(r.server, r.workload): r for r in results}
    print()
    for workload in ("cache-hit", "cache-miss"):
        lw = by.get(("linewarden", workload))
        if lw is None:
            continue
        for peer in ("dnsmasq", "unbound", "unbound-2t", "upstream"):
            other = by.get((peer, workload))
            if other and other.qps:
                print(f"ratio {workload:10s} linewarden/{peer:10s} = {lw.qps / other.qps:5.2f}")
    for name, (n, asked) in recorded.items():
        print(f"{name}: {n} dns records in the store for {asked} queries sent "
              f"(warm-up and readiness probe included; lost queries may never have arrived)")


if __name__ == "__main__":
    raise SystemExit(main())
