"""Reload benchmark (issue 7): a 100k-keyword + 1M-domain bundle, compiled and hot-swapped.

Prints, measured in one run:

* the bundle: size, ``rules pack`` and ``verify_bundle`` time;
* compile: ``Engine.from_dir`` wall time and the peak RSS of a fresh process doing only
  that (``ru_maxrss``), against the same process's RSS before loading (the baseline);
* latency of HTTP requests through a running ``linewarden run`` (explicit proxy, one
  HTTP worker process, loopback origin) by ``--clients`` keep-alive clients, p50/p99/max
  in three windows: before the push, during it (push sent → answer received), after;
  and the number of failed requests (the target: 0). The peer is a restart with the
  same bundle: the seconds during which no request could be served (a hot reload's
  answer to that is 0), and the ratio of the p99 during the reload to the p99 before.

Loopback only; every loop is bounded in count and time. Inputs are generated
deterministically and cached under benchmarks/out/reload-rules/.

Usage: .venv/bin/python benchmarks/bench_reload.py [--keywords 100000] [--domains 1000000]
       [--clients 50] [--window 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "out"
BODY = b"<html><body>an ordinary page of text</body></html>"
MAX_RUN_S = 900.0


def generate(d: Path, keywords: int, domains: int, version: int) -> Path:
    if (d / "ruleset.toml").exists() and f"version = {version}\n" in (d / "ruleset.toml").read_text():
        return d
    d.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(7)
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    with open(d / "keywords.tsv", "w", encoding="utf-8") as f:
        f.write("id\tcategory\tkeyword\n")
        seen: set[str] = set()
        while len(seen) < keywords:
            kw = "".join(rnd.choice(cjk) for _ in range(rnd.randint(3, 6)))
            if kw not in seen:
                seen.add(kw)
                f.write(f"K{len(seen)}\tbad\t{kw}\n")
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    with open(d / "domains.tsv", "w", encoding="utf-8") as f:
        f.write("id\tcategory\tdomain\n")
        for i in range(domains):
            name = "".join(rnd.choice(letters) for _ in range(rnd.randint(6, 14)))
            f.write(f"D{i}\tbad\t{name}{i}.{rnd.choice(('com', 'net', 'cn', 'org'))}\n")
    (d / "ruleset.toml").write_text(f'name = "bench"\nversion = {version}\n\n[categories.bad]\naction = "block"\n')
    return d


# Peak memory from VmHWM, which execve resets (ru_maxrss would carry the parent's peak).
COMPILE_CHILD = """
import sys, time, json
sys.path.insert(0, {root!r})
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from rules.engine import Engine
base = hwm()
t = time.perf_counter()
e = Engine.from_dir({d!r})
dt = time.perf_counter() - t
print(json.dumps({{"s": dt, "base_kb": base, "peak_kb": hwm(), "version": e.version}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        for _ in range(1_000_000):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n"
                         % len(BODY) + BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class Load:
    """``clients`` keep-alive clients; each sample is (t_start, latency, ok)."""

    def __init__(self, port: int, oport: int, clients: int) -> None:
        self.port, self.oport, self.clients = port, oport, clients
        self.samples: list[tuple[float, float, bool]] = []
        self.stop = asyncio.Event()

    async def one(self) -> None:
        deadline = time.monotonic() + MAX_RUN_S
        r = w = None
        for _ in range(1_000_000):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            t = time.monotonic()
            try:
                if w is None:
                    r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.write(f"GET http://127.0.0.1:{self.oport}/p HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                async with asyncio.timeout(30):
                    head = await r.readuntil(b"\r\n\r\n")  # type: ignore[union-attr]
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await r.readexactly(n)  # type: ignore[union-attr]
                self.samples.append((t, time.monotonic() - t, head.startswith(b"HTTP/1.1 200")))
            except (OSError, TimeoutError, asyncio.IncompleteReadError, IndexError, ValueError):
                self.samples.append((t, time.monotonic() - t, False))
                if w is not None:
                    w.close()
                r = w = None
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.02)
        if w is not None:
            w.close()

    def window(self, a: float, b: float) -> tuple[int, int, float, float, float]:
        xs = [s for s in self.samples if a <= s[0] < b]
        lat = [s[1] * 1000 for s in xs if s[2]]
        return len(xs), sum(not s[2] for s in xs), pct(lat, 0.5), pct(lat, 0.99), max(lat, default=float("nan"))


async def serve_and_measure(tmp: Path, small: Path, bundle: Path, keys_dir: Path, clients: int,
                            window: float) -> dict[str, object]:
    from linewarden.control import request

    srv = await asyncio.start_server(origin, "127.0.0.1", 0, backlog=1024)
    oport = srv.sockets[0].getsockname()[1]
    port = free_port()
    sock = tmp / "control.sock"
    cfg = tmp / "lw.toml"
    cfg.write_text(f'[rules]\ndir = "{small}"\npubkeys = ["{keys_dir}"]\ncontrol_socket = "{sock}"\n'
                   f'[store]\ndir = "{tmp / "store"}"\n[http]\nlisten = "127.0.0.1:{port}"\nworkers = 1\n'
                   f'[dns]\nenabled = false\n')
    log = open(tmp / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "linewarden", "run", "--config", str(cfg)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    out: dict[str, object] = {}
    try:
        deadline = time.monotonic() + 120
        while b"linewarden: store" not in (tmp / "run.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "run.log").read_text()[-2000:])
            await asyncio.sleep(0.1)
        load = Load(port, oport, clients)
        tasks = [asyncio.create_task(load.one()) for _ in range(clients)]
        await asyncio.sleep(1.0)  # warm-up
        t0 = time.monotonic()
        await asyncio.sleep(window)
        t1 = time.monotonic()
        data = bundle.read_bytes()
        answer = await asyncio.get_running_loop().run_in_executor(None, lambda: request(sock, "push", data))
        t2 = time.monotonic()
        await asyncio.sleep(window)
        t3 = time.monotonic()
        load.stop.set()
        await asyncio.gather(*tasks)
        out = {"answer": answer, "push_s": t2 - t1, "before": load.window(t0, t1),
               "during": load.window(t1, t2), "after": load.window(t2, t3)}
        # The peer: a restart with the big rule set installed (it starts from it).
        load2 = Load(port, oport, 1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        t_down = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "linewarden", "run", "--config", str(cfg)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        ok_at = None
        for _ in range(int(MAX_RUN_S * 10)):
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(f"GET http://127.0.0.1:{oport}/p HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                async with asyncio.timeout(5):
                    head = await r.readuntil(b"\r\n\r\n")
                w.close()
                if head.startswith(b"HTTP/1.1 200"):
                    ok_at = time.monotonic()
                    break
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.1)
        out["restart_gap_s"] = (ok_at - t_down) if ok_at else float("nan")
        del load2
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        srv.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keywords", type=int, default=100_000)
    ap.add_argument("--domains", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--window", type=float, default=5.0, help="seconds measured before and after")
    args = ap.parse_args()

    import tempfile

    from linewarden import keys
    from rules.bundle import pack, verify_bundle

    big = generate(OUT / "reload-rules" / f"k{args.keywords}-d{args.domains}", args.keywords, args.domains, 2)
    with tempfile.TemporaryDirectory(dir=OUT) as t:
        tmp = Path(t)
        pair = keys.generate(tmp / "keys")
        small = tmp / "small"
        small.mkdir()
        (small / "ruleset.toml").write_text('name = "bench"\nversion = 1\n\n[categories.bad]\naction = "block"\n')
        bundle = tmp / "big.bundle"
        t0 = time.perf_counter()
        pack(big, bundle, pair, now=datetime.now(timezone.utc))
        t_pack = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify_bundle(bundle, [pair.public], tmp / "verify", running_version=1)
        t_verify = time.perf_counter() - t0
        print(f"bundle: {args.keywords} keywords + {args.domains} domains, "
              f"{bundle.stat().st_size / 1e6:.1f} MB; pack {t_pack:.1f} s, verify (incl. validation) {t_verify:.1f} s")
        runs = []
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", COMPILE_CHILD.format(root=str(ROOT), d=str(big))],
                               capture_output=True, text=True, timeout=MAX_RUN_S)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        c = min(runs, key=lambda r: r["s"])
        print(f"compile (load + validate + compile, Engine.from_dir, best of 2): {c['s']:.1f} s; peak RSS {c['peak_kb'] / 1024:.0f} MB "
              f"(the same process before loading: {c['base_kb'] / 1024:.0f} MB)")
        res = asyncio.run(serve_and_measure(tmp, small, bundle, tmp / "keys", args.clients, args.window))
        a = res["answer"]
        print(f"push: ok={a['ok']} {a.get('message')} in {res['push_s']:.1f} s (verify + compile in the main "
              f"process and the worker, swap)")
        print(f"{'window':8} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name in ("before", "during", "after"):
            n, f, p50, p99, mx = res[name]  # type: ignore[misc]
            print(f"{name:8} {n:9d} {f:7d} {p50:8.1f} {p99:8.1f} {mx:8.1f}")
        before_p99, during_p99 = res["before"][3], res["during"][3]  # type: ignore[index]
        print(f"p99 during / before: {during_p99 / before_p99:.1f}x; requests failed during the reload: "
              f"{res['during'][1]}")  # type: ignore[index]
        print(f"peer — restart with the same rule set: no request served for {res['restart_gap_s']:.1f} s "
              f"(hot reload: 0 s)")


if __name__ == "__main__":
    main()
