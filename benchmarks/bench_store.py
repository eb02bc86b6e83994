"""Audit store benchmark: writer throughput against bare SQLite, enqueue latency, bytes per
record, and the two investigator queries on a generated multi-day store.

    .venv/bin/python benchmarks/bench_store.py [--days 8] [--per-day 1000000] [--writer-records 300000] [--runs 3]
    .venv/bin/python benchmarks/bench_store.py --writer-only [--writer-records 100000]   # throughput only

Prints, in one run:
  * sustained records/s of RecordWriter fed by the data-path producer pattern (many asyncio
    tasks calling submit() between awaits, on uvloop as in ``linewarden run``) and of a bare ``executemany`` loop into one
    SQLite file (same records, same durability, same two indexes), and their ratio. Both
    are the median of ``--runs`` runs taken alternately (bare, writer, bare, writer...) on
    fresh files: on a shared machine one run of either can be off by a third, and
    alternating exposes both to the same spells of load;
  * p50/p99/max latency of ``submit()`` (what the data path pays per record);
  * bytes on disk per record (day files of the generated store, indexes included);
  * time of "everything account X did on day D" (one day) and "who visited domain Y in
    the last 7 days" (seven days) through ``storage.query.query``.

The generated store (deterministic, seeded) is cached under benchmarks/out/ (git-ignored);
generation writes through the real writer (``write_records``) and shows progress.
Targets (issue 3): >= 50,000 records/s; both queries < 200 ms; <= 150 bytes per record.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import itertools
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import time
import zoneinfo
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.communityid import community_id  # noqa: E402
from storage.config import StoreConfig  # noqa: E402
from storage.query import query  # noqa: E402
from storage.records import Alarm, Conn, Dns, Http, Record, Session, Tls  # noqa: E402
from storage.retention import store_bytes  # noqa: E402
from storage.writer import RecordWriter, write_records  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
TZ = zoneinfo.ZoneInfo("Asia/Shanghai")
FIRST_DAY = dt.date(2026, 1, 5)
US = 1_000_000
B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
UAS = [f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{100 + i}.0.0.0 Safari/537.36" for i in range(20)] + [
    f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_{i} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.{i} Mobile/15E148 Safari/604.1" for i in range(10)]
CTYPES = ["text/html; charset=utf-8", "application/json", "image/jpeg", "image/png", "text/css", "application/javascript", "video/mp4"]
TLDS = ["com", "cn", "net", "org", "com.cn", "edu.cn", "gov.cn", "io"]


class Traffic:
    """A deterministic synthetic line: accounts with fixed addresses, Zipf-popular domains."""

    def __init__(self, seed: int, accounts: int = 3000, domains: int = 30000) -> None:
        self.rng = random.Random(seed)
        r = self.rng
        self.accounts = [f"u{i:05d}" for i in range(accounts)]
        self.acct_ip = [f"10.{16 + i // 250}.{i % 250}.{10 + i % 200}" for i in range(accounts)]
        self.acct_mac = [f"02:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01" for i in range(accounts)]
        self.domains = []
        for i in range(domains):
            base = "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(4, 12)))
            sub = r.choice(["www.", "", "api.", "img.", "cdn.", "m."])
            self.domains.append(f"{sub}{base}{i}.{r.choice(TLDS)}")
        self.server_ip = [f"{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}" for _ in range(domains)]
        w = [1 / (k + 1) ** 1.05 for k in range(domains)]
        self.cum = list(itertools.accumulate(w))
        self.acct_cum = list(itertools.accumulate(r.uniform(0.2, 2.0) for _ in range(accounts)))

    def domain(self) -> int:
        return bisect.bisect(self.cum, self.rng.random() * self.cum[-1])

    def account(self) -> int:
        return min(bisect.bisect(self.acct_cum, self.rng.random() * self.acct_cum[-1]), len(self.accounts) - 1)

    def uid(self) -> str:
        g = self.rng.getrandbits
        return "C" + "".join(B62[g(6) % 62] for _ in range(15))

    def records(self, start_us: int, span_us: int, n: int):
        """``n`` records with ts spread over [start, start + span), in time order."""
        r = self.rng
        step = span_us / n
        for k in range(n):
            ts = start_us + int(k * step) + r.randrange(max(int(step), 1))
            a, d = self.account(), self.domain()
            cip, sip = self.acct_ip[a], self.server_ip[d]
            cport = r.randint(20000, 65000)
            blocked = r.random() < 0.015
            common = dict(ts=ts, uid=self.uid(), account=self.accounts[a], client_ip=cip, client_port=cport,
                          client_mac=self.acct_mac[a], nat_ip=f"203.0.113.{1 + a % 8}", nat_port=r.randint(1024, 65535),
                          action="block" if blocked else "allow", rule_ids=["kw-0012"] if blocked else [],
                          ruleset_version=7)
            x = r.random()
            if x < 0.35:
                common.update(server_ip="10.0.0.1", server_port=53)
                yield Dns(**common, community_id=community_id("udp", cip, cport, "10.0.0.1", 53), qname=self.domains[d],
                          qtype=1, qtype_name="A", rcode=0, rcode_name="NOERROR", answers=[sip],
                          dns_id=r.getrandbits(16), latency_us=r.randint(300, 40000))
                continue
            common.update(server_ip=sip, server_port=443 if x < 0.88 else 80,
                          community_id=community_id("tcp", cip, cport, sip, 443 if x < 0.88 else 80))
            if x < 0.60:
                yield Tls(**common, sni=self.domains[d], alpn=["h2", "http/1.1"], tls_version="TLSv1.3")
            elif x < 0.88:
                yield Conn(**common, service="tls", ts_end=ts + r.randint(50_000, 120 * US), bytes_up=r.randint(500, 50_000),
                           bytes_down=r.randint(1000, 5_000_000), close_reason="fin", dns_name=self.domains[d])
            elif x < 0.995:
                yield Http(**common, method="GET" if r.random() < 0.85 else "POST", host=self.domains[d],
                           url=f"/{r.choice(['s', 'item', 'news', 'api/v2', 'static'])}/{r.getrandbits(24):x}",
                           status=200 if not blocked else None, content_type=r.choice(CTYPES),
                           resp_bytes=r.randint(0, 200_000), user_agent=r.choice(UAS),
                           category="illegal" if blocked else None, keyword="kw12" if blocked else None)
            elif x < 0.998:
                yield Session(ts=ts, account=self.accounts[a], client_ip=cip, client_mac=self.acct_mac[a],
                              method="portal", login_ts=ts, phone=f"1380000{a:04d}")
            else:
                yield Alarm(ts=ts, action="log", alarm_kind="illegal_content", detail=f"{self.accounts[a]} posted matched text")


def day_start(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=TZ).timestamp()) * US


# --- generated store -----------------------------------------------------------------------


def generated_store(days: int, per_day: int) -> Path:
    store = OUT / f"store-{days}d-{per_day}"
    marker = store / "GENERATED.json"
    if marker.exists():
        print(f"using cached store {store.relative_to(ROOT)}", flush=True)
        return store
    if store.exists():
        shutil.rmtree(store)
    traffic = Traffic(seed=1)
    last_end = day_start(FIRST_DAY + dt.timedelta(days=days))
    clock = lambda: last_end / US + 7200  # noqa: E731 - the days are over and closed
    cfg = StoreConfig(retention_days=180)
    t0 = time.perf_counter()
    deadline = t0 + 3600  # bounded: give up rather than run all night

    def progress():
        n = 0
        total = days * per_day
        for i in range(days):
            start = day_start(FIRST_DAY + dt.timedelta(days=i))
            for rec in traffic.records(start, 86400 * US, per_day):
                yield rec
                n += 1
                if n % 250_000 == 0:
                    el = time.perf_counter() - t0
                    print(f"  generating: {n:,}/{total:,} records, {el:.0f} s, {n / el:,.0f}/s", flush=True)
                    if time.perf_counter() > deadline:
                        raise SystemExit("generation exceeded its one-hour bound")

    print(f"generating {days} days x {per_day:,} records into {store.relative_to(ROOT)} (cached for next runs)", flush=True)
    n = write_records(store, progress(), cfg, clock=clock)
    marker.write_text(json.dumps({"days": days, "per_day": per_day, "records": n, "seconds": time.perf_counter() - t0}))
    print(f"generated {n:,} records in {time.perf_counter() - t0:.0f} s", flush=True)
    return store


# --- writer vs bare executemany ------------------------------------------------------------


async def writer_run(records: list[Record], store: Path, producers: int = 32) -> tuple[float, list[int], int]:
    cfg = StoreConfig()
    w = RecordWriter(store, cfg)
    await w.start()
    lat: list[int] = []
    per = (len(records) + producers - 1) // producers
    high = cfg.queue_max * 3 // 4
    pc = time.perf_counter_ns

    async def producer(chunk: list[Record]) -> None:
        # The data-path pattern: a handler produces a record or two, then awaits I/O.
        for i, rec in enumerate(chunk):
            t = pc()
            w.submit(rec)
            lat.append(pc() - t)
            if i % 4 == 3:
                await asyncio.sleep(0)
                while w.queued > high:  # the line is faster than the disk: back off, don't drop
                    await asyncio.sleep(0.002)

    t0 = time.perf_counter()
    await asyncio.gather(*(producer(records[k * per:(k + 1) * per]) for k in range(producers)))
    await w.flush()
    elapsed = time.perf_counter() - t0
    dropped = w.dropped
    await w.close()
    return len(records) / elapsed, lat, dropped


def bare_run(records: list[Record], path: Path, batch: int = 5000) -> float:
    """The peer: what a plain implementation does. One SQLite file, one table with the
    columns the two queries need plus the record's JSON, ``executemany`` of 5000 rows per
    transaction, WAL + synchronous=FULL, indexes (account, ts) and (domain, ts). No queue,
    no interning, no hash chain, no day files."""
    import msgspec

    enc = msgspec.json.Encoder()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE r(ts INTEGER, kind TEXT, account TEXT, domain TEXT, body BLOB)")
    conn.execute("CREATE INDEX r_a ON r(account, ts)")
    conn.execute("CREATE INDEX r_d ON r(domain, ts)")
    dom = {"conn": "dns_name", "http": "host", "tls": "sni", "dns": "qname"}

    def row(rec: Record) -> tuple:
        tag = rec.__struct_config__.tag  # type: ignore[attr-defined]
        return (rec.ts, tag, rec.account, getattr(rec, dom[tag]) if tag in dom else None, enc.encode(rec))

    t0 = time.perf_counter()
    for k in range(0, len(records), batch):
        rows = [row(r) for r in records[k:k + batch]]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO r VALUES (?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
    el = time.perf_counter() - t0
    conn.close()
    return len(records) / el


def pct(xs: list[int], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def timed(fn, repeat: int = 5) -> tuple[float, float, int]:
    """(first run ms, median of the next runs ms, result count)."""
    times, n = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn()
        times.append((time.perf_counter() - t) * 1000)
    return times[0], statistics.median(times[1:]), n


def throughput(recs: list[Record], runs: int) -> tuple[list[float], list[float], list[int], int, int, int]:
    """``runs`` alternating runs of the bare loop and the writer on fresh files: (bare rates,
    writer rates (sorted), submit() latencies of the median writer run, records dropped in
    all writer runs, bytes of the median writer run's store, bytes of the bare file)."""
    wdir, bare = OUT / "writer-run", OUT / "bare.sqlite"
    bare_rates: list[float] = []
    writer: list[tuple[float, list[int], int, int]] = []
    bare_bytes = 0
    for _ in range(runs):
        shutil.rmtree(wdir, ignore_errors=True)
        for p in (bare, Path(f"{bare}-wal"), Path(f"{bare}-shm")):
            p.unlink(missing_ok=True)
        bare_rates.append(bare_run(recs, bare))
        bare_bytes = os.path.getsize(bare) + (os.path.getsize(f"{bare}-wal") if os.path.exists(f"{bare}-wal") else 0)
        rate, lat, dropped = uvloop.run(writer_run(recs, wdir))  # the loop `linewarden run` uses
        writer.append((rate, lat, dropped, store_bytes(wdir)))
    writer.sort(key=lambda w: w[0])
    w_rates = [w[0] for w in writer]
    _, lat, _, wbytes = writer[len(writer) // 2]
    return bare_rates, w_rates, lat, sum(w[2] for w in writer), wbytes, bare_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=8)
    ap.add_argument("--per-day", type=int, default=1_000_000)
    ap.add_argument("--writer-records", type=int, default=300_000)
    ap.add_argument("--runs", type=int, default=3, help="alternating bare/writer throughput runs; medians are printed")
    ap.add_argument("--writer-only", action="store_true", help="only the throughput part (no generated store, no queries)")
    ap.add_argument("--only-generate", action="store_true")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    store = None if a.writer_only else generated_store(a.days, a.per_day)
    if a.only_generate:
        return 0

    # 1. throughput
    tr = Traffic(seed=2)
    recs = list(tr.records(day_start(dt.date.today()), 3600 * US, a.writer_records))
    bare_rates, w_rates, lat, dropped, wbytes, bare_bytes = throughput(recs, max(a.runs, 1))
    bare_rate, w_rate = statistics.median(bare_rates), statistics.median(w_rates)
    lat_us = [x / 1000 for x in lat]
    load = os.getloadavg()
    runs = f", median of {len(w_rates)} alternating runs" if len(w_rates) > 1 else ""
    print()
    print(f"linewarden audit store benchmark  (python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, "
          f"{os.cpu_count()} cpu, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})")
    print(f"writer throughput ({a.writer_records:,} records, 32 producer tasks, synchronous=FULL{runs}):")
    print(f"  RecordWriter            {w_rate:>10,.0f} records/s   (dropped {dropped}; runs {' '.join(f'{r:,.0f}' for r in w_rates)})")
    print(f"  bare executemany loop   {bare_rate:>10,.0f} records/s   (runs {' '.join(f'{r:,.0f}' for r in bare_rates)})")
    print(f"  ratio writer/bare       {w_rate / bare_rate:>10.2f}        target: >= 50,000 records/s sustained -> {'PASS' if w_rate >= 50_000 else 'FAIL'}")
    print(f"submit() latency: p50 {pct(lat_us, 50):.2f} us, p99 {pct(lat_us, 99):.2f} us, max {max(lat_us):.0f} us")
    sizes = f"  (writer run of {len(recs):,}: {wbytes / len(recs):.1f} bytes/record; bare executemany file: {bare_bytes / len(recs):.1f} bytes/record)"
    if store is None:
        print(sizes)
        return 0

    # 2. bytes per record on the generated store
    meta = json.loads((store / "GENERATED.json").read_text())
    total = store_bytes(store)
    bpr = total / meta["records"]

    # 3. queries
    t = Traffic(seed=1)  # same accounts and domains as the generated store
    day = FIRST_DAY + dt.timedelta(days=a.days - 2)
    d0 = day_start(day)
    weights = [b - a for a, b in zip([0.0, *t.acct_cum], t.acct_cum)]
    acct = t.accounts[max(range(len(weights)), key=weights.__getitem__)]  # the busiest account
    q1 = lambda: sum(1 for _ in query(store, account=acct, since=d0, until=d0 + 86400 * US))  # noqa: E731
    now = day_start(FIRST_DAY + dt.timedelta(days=a.days))
    dom = t.domains[2000]
    q2_records = lambda: sum(1 for _ in query(store, domain=dom, since=now - 7 * 86400 * US, until=now))  # noqa: E731
    q2_who = lambda: len({r.account for r in query(store, domain=dom, since=now - 7 * 86400 * US, until=now)})  # noqa: E731
    q1_first, q1_ms, q1_n = timed(q1)
    q2_first, q2_ms, q2_n = timed(q2_records)
    _, _, who = timed(q2_who, repeat=2)
    popular = t.domains[5]
    q3 = lambda: sum(1 for _ in query(store, domain=popular, since=now - 7 * 86400 * US, until=now))  # noqa: E731
    q3_first, q3_ms, q3_n = timed(q3, repeat=2)

    print(f"bytes on disk per record: {bpr:.1f} (generated store: {total / 1e9:.2f} GB / {meta['records']:,} records)   target <= 150 -> {'PASS' if bpr <= 150 else 'FAIL'}")
    print(sizes)
    print(f"query 'everything account {acct} did on {day}': {q1_n} records, {q1_ms:.1f} ms (first run {q1_first:.1f} ms)   target < 200 ms -> {'PASS' if max(q1_ms, q1_first) < 200 else 'FAIL'}")
    print(f"query 'who visited {dom} in the last 7 days': {q2_n} records, {who} accounts, {q2_ms:.1f} ms (first run {q2_first:.1f} ms)   target < 200 ms -> {'PASS' if max(q2_ms, q2_first) < 200 else 'FAIL'}")
    print(f"  (for scale, a top-10 domain, {popular}: {q3_n} records in 7 days streamed in {q3_ms:.0f} ms, ~{q3_ms * 1000 / max(q3_n, 1):.0f} us/record)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
