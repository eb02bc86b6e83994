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

linewarden records every query in its hash-chained store. The peers run twice:
as they come, and with their own per-query logging on (dnsmasq
``log-queries=extra`` to a file, unbound ``log-replies``), which is how a unit
would meet the audit obligation with them ("+log" rows).

Latency percentiles come from dnsperf's ``-v`` per-query lines (it prints only
the average itself). linewarden records every query: it answers before its
writer commits, so each of its workloads starts once the store holds a record of
every query sent so far (the wait is printed: the backlog the previous workload
left), and after its runs the store is counted and the count printed next to the
queries sent and those dnsperf gave up on.

Each server runs ``--rounds`` times (3), in alternating order; the table shows each
one's best round, and the ratios are medians of the rounds' own ratios (linewarden
against a peer measured in the same round), each round's printed beside it.

Usage: ``.venv/bin/python benchmarks/bench_dns.py [--seconds 10] [--workers 1] [--rounds 3]``
(needs dnsperf, dnsmasq and unbound: ``apt-get install dnsperf dnsmasq unbound``).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import signal
import socket
import statistics
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
    round: int = 0


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


def dnsmasq_conf(d: Path, port: int, up: int, blocked: list[str], log: bool) -> Path:
    conf = d / f"dnsmasq{'-log' if log else ''}.conf"
    lines = [f"port={port}", f"listen-address={HOST}", "bind-interfaces", "no-resolv",
             "no-hosts", "no-poll", "user=root", f"server={HOST}#{up}", "cache-size=10000"]
    if log:
        # Its way of recording every query (and its answer): a text log line each.
        lines += ["log-queries=extra", f"log-facility={d}/dnsmasq-queries.log"]
    lines += [f"address=/{name}/" for name in blocked]  # no address: NXDOMAIN
    conf.write_text("\n".join(lines) + "\n")
    return conf


def unbound_conf(d: Path, port: int, up: int, blocked: list[str], threads: int,
                 log: bool = False) -> Path:
    conf = d / f"unbound-{threads}{'-log' if log else ''}.conf"
    body = [
        "server:",
        f"  interface: {HOST}", f"  port: {port}", f"  num-threads: {threads}",
        "  username: \"\"", "  chroot: \"\"", f"  directory: \"{d}\"", "  pidfile: \"\"",
        "  use-syslog: no", f"  logfile: \"{d}/unbound-{threads}{'-log' if log else ''}.log\"",
        "  verbosity: 0", f"  log-replies: {'yes' if log else 'no'}",
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
                try:  # "> RCODE name type latency"; a line without a latency (a lost query) is skipped
                    lat.append(float(line.rsplit(b" ", 1)[1]))
                except ValueError:
                    pass
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


def stored_dns_rows(store: Path) -> int:
    """DNS records committed so far, counted in SQLite directly (cheap enough to poll)."""
    import sqlite3

    n = 0
    for f in sorted(store.glob("*.sqlite")):
        try:
            with sqlite3.connect(f"file:{f}?mode=ro", uri=True, timeout=5) as c:
                n += c.execute("SELECT count(*) FROM rec JOIN kinds ON rec.kind = kinds.code "
                               "WHERE kinds.tag = 'dns'").fetchone()[0]
                # The hit path's copies kept as runs (storage/runs.py): count each copy.
                n += c.execute("SELECT coalesce(sum(count), 0) FROM runs JOIN protos ON runs.proto = protos.id "
                               "JOIN kinds ON protos.kind = kinds.code WHERE kinds.tag = 'dns'").fetchone()[0]
        except sqlite3.Error:
            pass
    return n


def wait_recorded(store: Path, sent: int, timeout: float = 120.0) -> float:
    """Seconds until the store holds a record of every query sent (linewarden answers
    before its writer commits): each workload starts with the store caught up."""
    t0 = time.monotonic()
    while stored_dns_rows(store) < sent and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="length of each dnsperf run")
    ap.add_argument("--workers", type=int, default=1,
                    help="linewarden dns.workers (default 1, the product's default; 2 serves more cache "
                         "misses and fewer hits on a 2-core machine)")
    ap.add_argument("--miss-names", type=int, default=600_000,
                    help="unique names per cache-miss run (more than any server answers in --seconds)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="run every server this many times, in alternating order; the ratios are "
                         "medians of the rounds' own ratios (a shared machine's load varies)")
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
    recorded: dict[str, tuple[int, int, int]] = {}
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
        p_lw, p_ub2 = free_port(), free_port()
        servers.append(("upstream", [], {"port": up}))
        servers.append(("linewarden", [sys.executable, "-m", "linewarden", "run", "--config",
                                       str(linewarden_conf(work, p_lw, up, blocked, args.workers))],
                        {"port": p_lw, "cwd": ROOT}))
        for log in (False, True):
            suffix = "+log" if log else ""
            pd, pu = free_port(), free_port()
            servers.append((f"dnsmasq{suffix}", ["dnsmasq", "--keep-in-foreground", "--pid-file=",
                            f"--conf-file={dnsmasq_conf(work, pd, up, blocked, log)}"], {"port": pd}))
            servers.append((f"unbound{suffix}", ["unbound", "-d", "-c",
                            str(unbound_conf(work, pu, up, blocked, 1, log))], {"port": pu}))
        servers.append(("unbound-2t", ["unbound", "-d", "-c", str(unbound_conf(work, p_ub2, up, blocked, 2))],
                        {"port": p_ub2}))
        if args.only:
            servers = [s for s in servers if s[0] in args.only]
        for rnd_i in range(args.rounds):
            # Alternating order: a drift in the machine's load shifts no server's rounds
            # the same way every time.
            for name, cmd, opts in (servers if rnd_i % 2 == 0 else servers[::-1]):
                port = opts["port"]
                p = None
                if cmd:
                    p = procs.start(cmd, work / f"{name}.log", cwd=opts.get("cwd"))
                    wait_dns(port, timeout=180)
                sent = 1  # the readiness probe
                # Warm the cache, then the cache-hit run.
                w = dnsperf(port, hit, 5, True, work / f"{name}-warm.txt")
                sent += w.completed + w.lost
                lost = w.lost
                for workload in ("cache-hit", "cache-miss"):
                    if workload == "cache-hit":
                        data, once = hit, False
                    else:
                        data, once = work / f"miss-{name}.txt", True
                        tag = f"{re.sub('[^a-z0-9]', '', name)}{rnd.getrandbits(24):06x}"
                        data.write_text("".join(f"m{i}.{tag}.{ZONE} A\n" for i in range(args.miss_names)))
                    if name == "linewarden":
                        prev = recorded.get(name, (0, 0, 0))
                        waited = wait_recorded(work / "store", prev[1] - prev[2] + sent - lost)
                        print(f"round {rnd_i + 1} {name:12s} store caught up {waited:.1f} s before {workload}",
                              flush=True)
                    r = dnsperf(port, data, args.seconds, once, work / f"{name}-{workload}.txt")
                    r.server, r.workload, r.round = name, workload, rnd_i
                    results.append(r)
                    sent += r.completed + r.lost
                    lost += r.lost
                    print(f"round {rnd_i + 1} {name:12s} {workload:10s} {r.qps:9.0f} qps  "
                          f"p50 {r.p50_ms:6.3f} ms  p99 {r.p99_ms:6.3f} ms  lost {r.lost}", flush=True)
                if p is not None:
                    rc = procs.stop(p, 120)
                    if name == "linewarden":
                        _, before, lost_before = recorded.get(name, (0, 0, 0))
                        recorded[name] = (count_dns_records(work / "store"), before + sent, lost_before + lost)
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


def report(results: list[Result], recorded: dict[str, tuple[int, int, int]]) -> None:
    best: dict[tuple[str, str], Result] = {}
    for r in results:
        key = (r.server, r.workload)
        if key not in best or r.qps > best[key].qps:
            best[key] = r
    print()
    print(f"{'server':12s} {'workload':10s} {'qps':>9s} {'p50 ms':>8s} {'p99 ms':>8s}   (best round)")
    for r in best.values():
        print(f"{r.server:12s} {r.workload:10s} {r.qps:9.0f} {r.p50_ms:8.3f} {r.p99_ms:8.3f}")
    print()
    rounds = sorted({r.round for r in results})
    by = {(r.server, r.workload, r.round): r for r in results}
    print(f"ratios: median of the {len(rounds)} rounds' own ratios (linewarden and the peer in the "
          f"same round), each round's in brackets")
    for workload in ("cache-hit", "cache-miss"):
        for peer in ("dnsmasq", "unbound", "dnsmasq+log", "unbound+log", "unbound-2t", "upstream"):
            per = [by[("linewarden", workload, i)].qps / by[(peer, workload, i)].qps for i in rounds
                   if ("linewarden", workload, i) in by and by.get((peer, workload, i)) and by[(peer, workload, i)].qps]
            if per:
                each = " ".join(f"{x:.2f}" for x in per)
                print(f"ratio {workload:10s} linewarden/{peer:11s} = {statistics.median(per):5.2f}   [{each}]")
    for name, (n, asked, lost) in recorded.items():
        # A query dnsperf gave up on may still have been answered (late) and recorded.
        verdict = "every answered query recorded" if n >= asked - lost else "RECORDS MISSING"
        print(f"{name}: {n} dns records in the store for {asked} queries sent, {lost} of them "
              f"unanswered within dnsperf's timeout (warm-up and readiness probes included): {verdict}")


if __name__ == "__main__":
    raise SystemExit(main())
