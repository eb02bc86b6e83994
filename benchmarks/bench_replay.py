"""Benchmark: `linewarden replay` against `tshark` on the same ≥ 500 MB capture.

Generates (once; reused when present) a deterministic capture of mixed HTTP/1.1
keep-alive connections — Chinese and English text pages, about a third of them
gzip-encoded, a few carrying a keyword of the corpus rule set or asking for a
listed host — and DNS over UDP (a query and answer before each connection, plus
lookups of their own, some answered by CNAME chains). Then, in one run:

* the CPU split on the first 100 MB: the Engine's calls against the adapter
  (reader, reassembly, HTTP framing, DNS parsing), which says where a speed-up
  has to come from;
* ``linewarden replay --jobs 1 --rules R FILE`` (a subprocess, JSON lines to a
  file): MB/s and decisions/s; then the same with the default ``--jobs`` (one
  worker per CPU), and whether the two outputs are byte for byte the same;
* ``tshark -r FILE -Y "http.request || dns" -T fields -e ...`` on the same file:
  MB/s, and the ratio of each replay to it;
* with ``--runs K``, all of the above K times, interleaved (so a burst of load
  from other jobs hits every contestant), then the median of each figure and
  ratio; the load average is printed before and after;
* with ``--compare-readers``, the capture reader alone: our ``struct`` reader
  (proxy/pcap.py) against dpkt's Reader + Ethernet/IP/TCP decoding.

Checksums in the generated capture are left zero: neither tool verifies them by
default, and computing them in Python would only slow the generator.

Usage: .venv/bin/python benchmarks/bench_replay.py [--size-mb 520] [--runs 3] [--compare-readers]
Output under benchmarks/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
CORPUS = Path(os.environ.get("LINEWARDEN_CORPUS", ROOT.parent / "shared" / "corpus"))

MSS = 1448
GENERATOR_VERSION = 2
"""Part of the capture's file name: bump when the generator changes."""
T0 = 1_764_000_000_000_000
TIMEOUT_S = 3600
"""Each measured command is stopped after this long (bounded run)."""
HEARTBEAT_S = 15
"""A progress line on stderr this often while a measured command runs."""

TSHARK_FIELDS = ["frame.time_epoch", "ip.src", "ip.dst", "http.host", "http.request.method", "http.request.uri",
                 "dns.id", "dns.qry.name", "dns.cname"]

BENIGN_HOSTS = ["www.qq.com", "news.sina.com.cn", "item.jd.com", "www.163.com", "tieba.baidu.com",
                "www.zhihu.com", "weibo.com", "www.example.edu.cn", "static.sohu.com", "www.ifeng.com"]
ZH = ("今天天气很好我们一起去公园散步顺便讨论一下最近的新闻和学习计划图书馆的开放时间"
      "已经调整请大家注意安排时间社区活动中心将举办读书会欢迎报名参加")
EN = ("the quick brown fox jumps over the lazy dog while the library extends its opening "
      "hours and the community centre announces a reading club for everyone ")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Rule set: the corpus lists in linewarden format (fallback: bundled sample rules)


def build_rules(dest: Path) -> tuple[Path, list[str], list[str]]:
    """Rules dir, some keywords and some blocked host names to plant."""
    kw_src, dom_src = CORPUS / "rules" / "keywords.tsv", CORPUS / "rules" / "domains.txt"
    if not kw_src.exists():
        sys.path.insert(0, str(ROOT))
        from rules.engine import SAMPLE_RULES

        return SAMPLE_RULES, [], []
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(kw_src, dest / "keywords.tsv")
    lines = ["id\tcategory\tdomain\taction"]
    hosts: list[str] = []
    n = 0
    for line in dom_src.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pattern, category = line.split("\t")[:2]
        n += 1
        lines.append(f"D{n:05d}\t{category}\t{pattern if pattern.startswith('*.') else '=' + pattern}\tblock")
        hosts.append(pattern.replace("*.", "www.") if pattern.isascii() else "")
    (dest / "domains.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    categories = sorted({ln.split("\t")[1] for ln in kw_src.read_text(encoding="utf-8").splitlines()[1:] if ln})
    toml = ['name = "bench"', "version = 1", ""]
    for c in categories:
        toml += [f"[categories.{c}]", 'action = "block"', ""]
    (dest / "ruleset.toml").write_text("\n".join(toml), encoding="utf-8")
    keywords = [ln.split("\t")[2] for ln in kw_src.read_text(encoding="utf-8").splitlines()[1:] if ln]
    return dest, keywords, [h for h in hosts if h]


# ---------------------------------------------------------------------------
# Capture generation


def _eth_ip(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src, dst)
    return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip + l4


def _tcp(src: bytes, dst: bytes, sp: int, dp: int, seq: int, ack: int, flags: int, data: bytes = b"") -> bytes:
    return _eth_ip(src, dst, 6, struct.pack("!HHIIBBHHH", sp, dp, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags,
                                            65535, 0, 0) + data)


def _udp(src: bytes, dst: bytes, sp: int, dp: int, data: bytes) -> bytes:
    return _eth_ip(src, dst, 17, struct.pack("!HHHH", sp, dp, 8 + len(data), 0) + data)


def _page(rnd: random.Random, keywords: list[str]) -> bytes:
    size = rnd.choice([4, 8, 16, 32, 64]) * 1024
    paras = []
    total = 0
    while total < size:
        text = ZH[rnd.randrange(20):] if rnd.random() < 0.6 else EN
        p = f"<p>{text}</p>\n"
        paras.append(p)
        total += len(p.encode())
    if keywords and rnd.random() < 0.05:  # one page in twenty carries a keyword
        i = rnd.randrange(len(paras))
        paras[i] = paras[i][:20] + rnd.choice(keywords) + paras[i][20:]
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>页面</title></head><body>\n"
            + "".join(paras) + "</body></html>\n").encode()


def _responses(rnd: random.Random, keywords: list[str], n: int = 160) -> list[bytes]:
    out = []
    for _ in range(n):
        body = _page(rnd, keywords)
        headers = "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nServer: bench\r\n"
        if rnd.random() < 0.33:
            body = gzip.compress(body, 6, mtime=0)
            headers += "Content-Encoding: gzip\r\n"
        out.append(f"{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


def _dns_query(qid: int, name: str, qtype: int = 1) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def _dns_answer(qid: int, name: str, cname: str | None, addr: bytes) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    answers = b""
    count = 1
    if cname:
        target = b"".join(bytes([len(p)]) + p.encode() for p in cname.split(".")) + b"\0"
        answers += b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, len(target)) + target
        answers += b"\xc0" + bytes([12 + len(q) + 4 + 12]) + struct.pack("!HHIH", 1, 1, 300, 4) + addr
        count = 2
    else:
        answers += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + addr
    return struct.pack("!HHHHHH", qid, 0x8180, 1, count, 0, 0) + q + struct.pack("!HH", 1, 1) + answers


def generate(path: Path, size_mb: int, keywords: list[str], bad_hosts: list[str], seed: int = 1) -> None:
    rnd = random.Random(seed)
    responses = _responses(rnd, keywords)
    target = size_mb * 1_000_000
    resolver = bytes([198, 51, 100, 53])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb", buffering=1 << 22) as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        written, ts, conn = 24, T0, 0
        rec = struct.Struct("<IIII").pack
        next_log = time.monotonic() + 2

        def put(frame: bytes) -> None:
            nonlocal written, ts
            ts += 37
            sec, usec = divmod(ts, 1_000_000)
            f.write(rec(sec, usec, len(frame), len(frame)))
            f.write(frame)
            written += 16 + len(frame)

        while written < target:
            conn += 1
            client = bytes([192, 0, 2, 1 + conn % 250])
            server = bytes([203, 0, 113, 1 + (conn * 7) % 250])
            cport = 10000 + conn % 50000
            host = rnd.choice(bad_hosts) if bad_hosts and rnd.random() < 0.02 else rnd.choice(BENIGN_HOSTS)
            # DNS lookups: the connection's host, and one more (sometimes a CNAME to a listed name).
            qid = conn & 0xFFFF
            put(_udp(client, resolver, 20000 + conn % 40000, 53, _dns_query(qid, host)))
            put(_udp(resolver, client, 53, 20000 + conn % 40000, _dns_answer(qid, host, None, server)))
            other = rnd.choice(BENIGN_HOSTS)
            cname = ("edge." + rnd.choice(bad_hosts)) if bad_hosts and rnd.random() < 0.05 else None
            put(_udp(client, resolver, 20001 + conn % 40000, 53, _dns_query(qid ^ 0x5A5A, other)))
            put(_udp(resolver, client, 53, 20001 + conn % 40000, _dns_answer(qid ^ 0x5A5A, other, cname, server)))
            # TCP: handshake, 1-4 keep-alive transactions, FIN.
            cs, ss = rnd.getrandbits(32), rnd.getrandbits(32)
            put(_tcp(client, server, cport, 80, cs, 0, 0x02))
            put(_tcp(server, client, 80, cport, ss, cs + 1, 0x12))
            cs, ss = cs + 1, ss + 1
            put(_tcp(client, server, cport, 80, cs, ss, 0x10))
            for _ in range(rnd.randint(1, 4)):
                path_q = f"/news/{rnd.randrange(10**6)}.html?from=index&page={rnd.randrange(50)}"
                req = (f"GET {path_q} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0 bench\r\n"
                       f"Accept-Encoding: gzip\r\nAccept: text/html\r\n\r\n").encode()
                put(_tcp(client, server, cport, 80, cs, ss, 0x18, req))
                cs += len(req)
                resp = rnd.choice(responses)
                for i in range(0, len(resp), MSS):
                    piece = resp[i : i + MSS]
                    put(_tcp(server, client, 80, cport, ss, cs, 0x18 if i + MSS >= len(resp) else 0x10, piece))
                    ss += len(piece)
                    if (i // MSS) % 2:
                        put(_tcp(client, server, cport, 80, cs, ss, 0x10))
            put(_tcp(client, server, cport, 80, cs, ss, 0x11))
            put(_tcp(server, client, 80, cport, ss, cs + 1, 0x11))
            put(_tcp(client, server, cport, 80, cs + 1, ss + 1, 0x10))
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + 2
                log(f"  generating: {written / 1e6:6.0f} / {size_mb} MB")
    tmp.rename(path)


# ---------------------------------------------------------------------------
# Measurements


def timed(cmd: list[str], stdout_path: Path) -> tuple[float, int]:
    """Run ``cmd`` (bounded by TIMEOUT_S), stdout to a file; seconds and output lines."""
    log(f"  $ {' '.join(cmd)}")
    start = time.monotonic()
    err_path = stdout_path.with_suffix(".stderr")
    with open(stdout_path, "wb") as out, open(err_path, "wb") as errf:
        proc = subprocess.Popen(cmd, stdout=out, stderr=errf)
        while True:
            try:
                proc.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - start
                if elapsed > TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                    raise SystemExit(f"timed out after {TIMEOUT_S} s: {cmd[0]}") from None
                log(f"    ... {elapsed:.0f} s, {os.path.getsize(stdout_path) / 1e6:.1f} MB of output so far")
    secs = time.monotonic() - start
    err = err_path.read_bytes()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    tail = err.decode(errors="replace").strip().splitlines()
    if tail:
        log(f"    {tail[-1]}")
    with open(stdout_path, "rb") as fh:
        lines = sum(1 for _ in fh)
    return secs, lines


def compare_readers(path: Path) -> None:
    """Our struct reader vs dpkt, decoding every packet down to TCP/UDP payload."""
    sys.path.insert(0, str(ROOT))
    import dpkt

    from proxy.pcap import read_packets

    size = path.stat().st_size
    start = time.monotonic()
    n = 0
    with open(path, "rb") as f:
        for _ in read_packets(f):
            n += 1
    ours = time.monotonic() - start
    start = time.monotonic()
    m = 0
    with open(path, "rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(ip.data, (dpkt.tcp.TCP, dpkt.udp.UDP)):
                m += 1
    theirs = time.monotonic() - start
    print(f"reader: struct (proxy/pcap.py) {n} packets in {ours:.2f} s = {size / 1e6 / ours:.0f} MB/s, "
          f"{n / ours / 1000:.0f} kpkt/s")
    print(f"reader: dpkt {m} packets in {theirs:.2f} s = {size / 1e6 / theirs:.0f} MB/s, "
          f"{m / theirs / 1000:.0f} kpkt/s  (struct is {theirs / ours:.2f}x faster)")


def cpu_split(path: Path, rules: Path, limit_mb: int) -> None:
    """CPU time of the Engine's calls against the rest (reader, reassembly, HTTP
    framing, DNS parsing, pairing) on the first ``limit_mb`` MB, in this process:
    tells which part a speed-up has to come from."""
    sys.path.insert(0, str(ROOT))
    from proxy.pcap import CaptureStats, read_packets
    from proxy.replay import Replay
    from rules.engine import BodyScan, Engine

    engine = Engine.from_dir(rules)
    engine.scan_text("warm-up 中文")  # one-time table builds are not per-byte costs
    spent = [0.0]

    def timed_method(cls: type, name: str) -> None:
        inner = getattr(cls, name)

        def wrapper(*a: object, **k: object) -> object:
            t = time.process_time()
            try:
                return inner(*a, **k)
            finally:
                spent[0] += time.process_time() - t

        setattr(cls, name, wrapper)

    for name in ("request_scanner", "response_scanner", "dns", "dns_chain", "tls"):
        timed_method(Engine, name)
    for name in ("feed", "finish"):
        timed_method(BodyScan, name)
    stats = CaptureStats()
    replay = Replay(engine, flow_ids=False)  # as `linewarden replay` without --store
    start = time.process_time()
    with open(path, "rb") as f:
        for pkt in read_packets(f, stats):
            replay.packet(pkt)
            if stats.bytes > limit_mb * 1_000_000:
                break
    replay.finish()
    total = time.process_time() - start
    adapter = total - spent[0]
    mb = stats.bytes / 1e6
    print(f"cpu split on the first {mb:.0f} MB: Engine {spent[0]:.1f} s ({spent[0] / total:.0%}), "
          f"adapter {adapter:.1f} s ({adapter / total:.0%}); adapter alone: {mb / adapter:.0f} MB/s, "
          f"Engine alone: {mb / spent[0]:.1f} MB/s (CPU seconds, one core)")


def install_tshark() -> str | None:
    """Install Debian's tshark when running as root (non-interactive; the
    wireshark-common question about setuid dumpcap is answered 'no')."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    log("tshark missing: apt-get install -y tshark")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=b"wireshark-common wireshark-common/install-setuid boolean false\n",
                   check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "tshark"], check=False, env=env, timeout=900,
                   stdout=subprocess.DEVNULL)
    return shutil.which("tshark")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=520, help="capture size to generate (default 520)")
    ap.add_argument("--regenerate", action="store_true", help="write the capture again even if present")
    ap.add_argument("--compare-readers", action="store_true", help="also time struct reader vs dpkt")
    ap.add_argument("--skip-tshark", action="store_true")
    ap.add_argument("--split-mb", type=int, default=100,
                    help="MB of the capture for the Engine/adapter CPU split (0 = skip; default 100)")
    ap.add_argument("--runs", type=int, default=1,
                    help="measure every contestant this many times, interleaved, and print medians (default 1)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rules, keywords, bad_hosts = build_rules(OUT / "rules")
    cap = OUT / f"mixed-{args.size_mb}mb-v{GENERATOR_VERSION}.pcap"
    if args.regenerate or not cap.exists():
        log(f"generating {cap} ({args.size_mb} MB)")
        t = time.monotonic()
        generate(cap, args.size_mb, keywords, bad_hosts)
        log(f"  done in {time.monotonic() - t:.0f} s")
    size = cap.stat().st_size
    print(f"capture: {cap} ({size / 1e6:.0f} MB)")
    if args.compare_readers:
        compare_readers(cap)
    if args.split_mb:
        cpu_split(cap, rules, args.split_mb)

    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
    base = [py, "-m", "linewarden", "replay", "--rules", str(rules), "--no-progress"]
    sys.path.insert(0, str(ROOT))
    from linewarden.commands.replay import default_jobs

    jobs = default_jobs([cap])
    variants = [("replay --jobs 1", ["--jobs", "1"])]
    if jobs > 1:
        variants.append((f"replay (default: --jobs 0 = {jobs} workers)", []))
    tshark = None if args.skip_tshark else shutil.which("tshark") or install_tshark()
    if tshark is None and not args.skip_tshark:
        print("tshark: not installed (DEBIAN_FRONTEND=noninteractive apt-get install -y tshark); no ratio")
    tshark_cmd = [str(tshark), "-r", str(cap), "-Y", "http.request || dns", "-T", "fields"]
    for fld in TSHARK_FIELDS:
        tshark_cmd += ["-e", fld]
    results: dict[str, object] = {"capture_mb": round(size / 1e6), "load_before": os.getloadavg()}
    secs: dict[str, list[float]] = {}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for run in range(args.runs):
        tag = f"[run {run + 1}/{args.runs}] " if args.runs > 1 else ""
        outputs = []
        for i, (label, extra) in enumerate(variants):
            out_path = OUT / f"replay-{i}.jsonl"
            took, decisions = timed(base + extra + [str(cap)], out_path)
            outputs.append(out_path)
            secs.setdefault(label, []).append(took)
            print(f"{tag}linewarden {label}: {took:.1f} s, {size / 1e6 / took:.1f} MB/s, {decisions} decisions, "
                  f"{decisions / took:.0f} decisions/s")
            results.setdefault("decisions", decisions)
        if len(outputs) > 1:
            same = all(_same_file(outputs[0], o) for o in outputs[1:])
            print(f"{tag}outputs of {' and '.join(v[0] for v in variants)} byte for byte identical: "
                  f"{'yes' if same else 'NO'}")
            results["identical"] = same and results.get("identical", True)
        if tshark is not None:
            took, rows = timed(tshark_cmd, OUT / "tshark.tsv")
            secs.setdefault("tshark", []).append(took)
            print(f"{tag}tshark: {took:.1f} s, {size / 1e6 / took:.1f} MB/s, {rows} rows")
            for label, _ in variants:
                ratio = took / secs[label][-1]
                print(f"{tag}ratio: linewarden {label} runs at {ratio:.2f}x tshark's speed "
                      f"({'faster' if ratio > 1 else 'slower'} than tshark)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results["load_after"] = os.getloadavg()
    for label, values in secs.items():
        med = statistics.median(values)
        results[label] = {"s": [round(v, 2) for v in values], "median_mbps": round(size / 1e6 / med, 1)}
        if args.runs > 1:
            print(f"median of {len(values)}: {label}: {med:.1f} s, {size / 1e6 / med:.1f} MB/s")
    if "tshark" in secs:
        for label, _ in variants:
            ratios = [t / r for t, r in zip(secs["tshark"], secs[label])]
            med = statistics.median(ratios)
            results[f"ratio {label}"] = [round(r, 2) for r in ratios]
            if args.runs > 1:
                print(f"median ratio: linewarden {label} runs at {med:.2f}x tshark's speed "
                      f"(runs: {', '.join(f'{r:.2f}' for r in ratios)})")
    (OUT / "result.json").write_text(json.dumps(results) + "\n")
    return 0


def _same_file(a: Path, b: Path) -> bool:
    """Byte-for-byte comparison, 1 MiB at a time."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    raise SystemExit(main())
