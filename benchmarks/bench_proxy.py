#!/usr/bin/env python3
"""HTTP proxy throughput, side by side with peers, in one run on this machine (issue 4).

Measures, on loopback only, with bounded durations:

* wrk (absolute-form requests, keep-alive) for 1 KB, 64 KB and 1 MB text/html pages
  against: the origin (nginx) directly; linewarden (`linewarden run`, explicit
  mode, content scanning on with N keywords, every decision recorded in the
  store); e2guardian with the same keywords as a banned phrase list; squid
  (no scanning, access log on).
* TLS passthrough through an explicit CONNECT: new connections per second (each
  with an SNI decision, a TLS handshake and a 1 KB GET) and bulk MB/s (a 64 MiB
  download per connection), linewarden vs squid with ``ssl_bump peek`` + ``splice``,
  in alternating rounds (medians), with each proxy's CPU per connection and per GB,
  the client's CPU and the machine's (proxy + curl + nginx) CPU per GB, and the
  records linewarden wrote checked against the transfers. linewarden relays with
  its default ``http.relay = "auto"``: every end is on this machine, so it copies
  (``--relay splice`` runs the relay a gateway between two other hosts uses).
  squid runs as many SMP workers as linewarden has proxy workers (``--squid-workers``).
  ``--baseline PATH`` runs a second linewarden from another checkout in the same
  rounds, so a change is measured against the code before it under the same load.
* each proxy's resident memory with 1,000 idle keep-alive client connections.
* ``--instructions N`` (instead of all that): the instructions linewarden's fast path runs
  per TLS passthrough connection, counted by valgrind's callgrind in one process, for this
  checkout and ``--baseline``: an A/B of a few per cent, which the rates on this shared
  machine cannot show (needs valgrind).

Prints req/s, MB/s and the ratios linewarden/e2guardian and linewarden/squid.
Needs: wrk nginx squid-openssl e2guardian (apt-get install -y wrk nginx-light
squid-openssl e2guardian); a missing peer is reported and skipped.

e2guardian and large Chinese phrase lists: e2guardian builds one byte graph of
all phrase lists of a filter group (``.Include``d files and the weighted and
exception lists are merged into it) and refuses a graph where a node needs more
than 60 links ("Cannot load phraselists from this many languages/encodings
simultaneously (more than 60 links from this node!)"). UTF-8 CJK text has up to
64 continuation bytes after a common lead byte, so a large list of *arbitrary*
Chinese phrases trips it, and splitting the list into files does not help
(measured: 10k phrases of uniformly random CJK characters are refused whole or
split). The phrases used here are drawn from the ~400 most common characters
(plus the corpus keywords), whose graph stays within the limit, so both proxies
get exactly the same 10k phrases; ``phrase_graph_links`` reports the widest node.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
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
sys.path.insert(0, str(ROOT))
PY = sys.executable
PAGES = {"1k": 1024, "64k": 64 * 1024, "1m": 1024 * 1024}
PROBE_KEYWORD = "澳门赌场代理网址"
"""Put first in the keyword list; the probe page holds it, so each scanning proxy must block it."""
PROBE_PAGE = f"<html><body><p>最新{PROBE_KEYWORD}大全</p></body></html>\n"
PAGE_CONNS = {"1k": 32, "64k": 16, "1m": 4}
"""wrk connections per page size at the default ``--connections 32`` (scaled with it)."""
TLS_PARALLEL = 16
"""Concurrent new TLS connections in the conn/s run (curl --parallel-max)."""
BULK_BYTES = 64 << 20
BULK_TRANSFERS, BULK_PARALLEL = 32, 4
"""The bulk run: 32 downloads of 64 MiB (2 GiB, a few seconds: long enough to
measure on a shared machine), 4 at a time, each through its own tunnel."""
E2G_MAX_LINKS = 60
"""e2guardian's per-node child limit in its phrase trie (ListContainer)."""

# Common characters of Chinese web text; pages and keywords both draw from it.
POOL = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行"
        "学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些"
        "然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月"
        "公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


# -- inputs -----------------------------------------------------------------------------------


def make_keywords(n: int, seed: int = 4) -> list[str]:
    """The corpus keywords (when present) plus deterministic synthetic 4-7 character phrases."""
    out: list[str] = []
    corpus = ROOT.parent / "shared" / "corpus" / "rules" / "keywords.tsv"
    if corpus.exists():
        for line in corpus.read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 3:
                out.append(parts[2])
    out.insert(0, PROBE_KEYWORD)
    rng = random.Random(seed)
    seen = set(out)
    while len(out) < n:
        k = "".join(rng.choice(POOL) for _ in range(rng.randint(4, 7)))
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out[:n]


def make_page(size: int, seed: int) -> bytes:
    """A text/html page of ``size`` bytes of Chinese prose-like text."""
    rng = random.Random(seed)
    head, tail = b"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>t</title></head><body><p>", b"</p></body></html>\n"
    body = bytearray()
    while len(body) < size - len(head) - len(tail):
        body += "".join(rng.choice(POOL) for _ in range(rng.randint(8, 30))).encode() + "。".encode()
        if rng.random() < 0.1:
            body += b"</p>\n<p>"
    page = head + bytes(body) + tail
    return page[: size - len(tail)].decode("utf-8", "ignore").encode() + tail if len(page) > size else page


def write_rules(d: Path, keywords: list[str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ruleset.toml").write_text('name = "bench"\nversion = 1\n\n[categories.bench]\naction = "block"\n')
    (d / "keywords.tsv").write_text(
        "id\tcategory\tkeyword\n" + "".join(f"B{i:05d}\tbench\t{k}\n" for i, k in enumerate(keywords)),
        encoding="utf-8")


def phrase_graph_links(phrases: list[str]) -> int:
    """The most links any node of e2guardian's byte graph of ``phrases`` needs."""
    children: dict[bytes, set[int]] = {}
    for p in phrases:
        b = p.encode()
        for i in range(len(b)):
            children.setdefault(b[:i], set()).add(b[i])
    return max((len(v) for v in children.values()), default=0)


def self_signed(d: Path, cn: str = "bench.example") -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(key, hashes.SHA256()))
    c, k = d / f"{cn}.crt", d / f"{cn}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


# -- the processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    port: int
    popen: subprocess.Popen[bytes]
    tls_port: int | None = None

    def pids(self) -> list[int]:
        """The process and its descendants (squid's kid, e2guardian's children, linewarden's
        workers), whichever of a process's threads started them (``/proc/PID/task/TID/children``
        lists only the children of thread TID)."""
        out = [self.popen.pid]
        frontier = [self.popen.pid]
        while frontier:
            pid = frontier.pop()
            kids: list[str] = []
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    kids += (task / "children").read_text().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                frontier.append(int(k))
        return out

    def cpu_s(self, main_only: bool = False) -> float:
        """User + system CPU seconds of the process and its descendants (live ones), or of
        the process alone (``main_only``: linewarden's main process, where the store writer
        runs; squid's master)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.popen.pid] if main_only else self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
        return total / tick

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # our own child, by its handle
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start_nginx(work: Path) -> Proc:
    www = work / "www"
    www.mkdir()
    for name, size in PAGES.items():
        (www / f"{name}.html").write_bytes(make_page(size, seed=size))
    (www / "probe.html").write_text(PROBE_PAGE, encoding="utf-8")
    with open(www / "bulk.bin", "wb") as f:
        f.write(os.urandom(BULK_BYTES))
    cert, key = self_signed(work, "origin.example")
    port, tls_port = free_port(), free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    types {{ text/html html; application/octet-stream bin; }}
    default_type application/octet-stream;
    charset utf-8;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp;
    fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp;
    scgi_temp_path {work}/nginx-tmp;
    server {{ listen 127.0.0.1:{port}; root {www}; }}
    server {{ listen 127.0.0.1:{tls_port} ssl; root {www};
             ssl_certificate {cert}; ssl_certificate_key {key}; }}
}}
""")
    p = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_port(port, None)
    return Proc("origin", port, p, tls_port)


def start_linewarden(work: Path, keywords: list[str], workers: int, relay: str | None = None, *,
                     root: Path = ROOT, name: str = "linewarden") -> Proc:
    """``linewarden run`` from the checkout at ``root`` (``--baseline`` runs a second one,
    in a folder of its own under ``work``)."""
    if name != "linewarden":
        work = work / name
        work.mkdir()
    rules = work / "lw-rules"
    write_rules(rules, keywords)
    port = free_port()
    cfg = work / "linewarden.toml"
    cfg.write_text(f"""
[rules]
dir = "{rules}"
[store]
dir = "{work / 'lw-store'}"
[http]
listen = "127.0.0.1:{port}"
mode = "explicit"
workers = {workers}
{f'relay = "{relay}"' if relay else ''}
[dns]
enabled = false
""")
    logf = open(work / "linewarden.log", "wb")
    p = subprocess.Popen([PY, "-m", "linewarden", "run", "--config", str(cfg)], cwd=root,
                         stdout=logf, stderr=subprocess.STDOUT)
    wait_port(port, p, timeout=120)
    return Proc(name, port, p, port)


def start_squid(work: Path, workers: int = 1) -> Proc | None:
    if shutil.which("squid") is None:
        log("squid: not installed (apt-get install -y squid-openssl); skipped")
        return None
    d = work / "squid"
    d.mkdir()
    os.chmod(d, 0o777)
    cert, key = self_signed(d, "squid-ca.example")
    pem = d / "bump.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    os.chmod(pem, 0o644)
    port, tls_port = free_port(), free_port()
    conf = d / "squid.conf"
    conf.write_text(f"""
http_port 127.0.0.1:{port}
http_port 127.0.0.1:{tls_port} ssl-bump tls-cert={pem} generate-host-certificates=off
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump splice all
http_access allow all
cache deny all
cache_mem 8 MB
access_log stdio:{d}/access.log
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
workers {workers}
max_filedescriptors 65536
shutdown_lifetime 1 seconds
""")
    # -N (no kids) only runs one worker; SMP workers need the master: --foreground.
    mode = ["-N"] if workers == 1 else ["--foreground"]
    p = subprocess.Popen(["squid", *mode, "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, p)
        wait_port(tls_port, p)
    except RuntimeError as e:
        log(f"squid: did not start ({e}); see {d}/cache.log")
        return None
    return Proc("squid", port, p, tls_port)


def start_e2guardian(work: Path, keywords: list[str]) -> Proc | None:
    if shutil.which("e2guardian") is None:
        log("e2guardian: not installed (apt-get install -y e2guardian); skipped")
        return None
    d = work / "e2g"
    shutil.copytree("/etc/e2guardian", d)
    port = free_port()
    lists = d / "lists"
    (lists / "bannedphraselist").write_text("".join(f"<{k}>\n" for k in keywords), encoding="utf-8")
    for empty in ("weightedphraselist", "exceptionphraselist"):
        (lists / empty).write_text("")
    for f in d.rglob("*"):
        if f.is_file():
            try:
                text = f.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            if "/etc/e2guardian" in text:
                f.write_text(text.replace("/etc/e2guardian", str(d)))
    conf = d / "e2guardian.conf"
    text = conf.read_text()
    text = re.sub(r"(?m)^filterports = .*$", f"filterports = {port}", text)
    text = re.sub(r"(?m)^filterip =.*$", "filterip = 127.0.0.1", text)
    text += (f"\npidfilename = '{d}/e2g.pid'\nloglocation = '{d}/access.log'\n"
             f"ipcfilename = '{d}/e2g.ipc'\nurlipcfilename = '{d}/e2g-url.ipc'\nipipcfilename = '{d}/e2g-ip.ipc'\n"
             "nodaemon = on\n")
    conf.write_text(text)
    os.chmod(d, 0o777)
    logf = open(d / "stderr.log", "wb")
    p = subprocess.Popen(["e2guardian", "-N", "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_port(port, p, timeout=120)
    except RuntimeError as e:
        log(f"e2guardian: did not start ({e}): {(d / 'stderr.log').read_text(errors='replace')[-800:]}"
            f" (widest phrase-graph node: {phrase_graph_links(keywords)} links, limit {E2G_MAX_LINKS})")
        return None
    log(f"e2guardian: {len(keywords)} phrases, widest graph node {phrase_graph_links(keywords)} links "
        f"(limit {E2G_MAX_LINKS})")
    return Proc("e2guardian", port, p)


# -- load ---------------------------------------------------------------------------------------

WRK_LUA = """
wrk.path = "{url}"
wrk.headers["Host"] = "{host}"
"""


def wrk(port: int, url: str, host: str, duration: int, conns: int, threads: int, work: Path) -> tuple[float, float]:
    """req/s and MB/s of one wrk run against ``port`` (a proxy or the origin)."""
    script = work / "wrk.lua"
    script.write_text(WRK_LUA.format(url=url, host=host))
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--timeout", "10s",
                          "-s", str(script), f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    scale = {"B": 1 / 1e6, "KB": 1024 / 1e6, "MB": 1024 * 1024 / 1e6, "GB": 1024**3 / 1e6}
    mbs = float(m.group(1)) * scale[m.group(2)] if m else 0.0
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        log(f"  warning: {errors.group(1)} non-2xx responses on :{port} {url}")
    if "Socket errors" in out:
        log("  " + out.split("Socket errors", 1)[1].splitlines()[0])
    return rps, mbs


@dataclass
class TlsRun:
    """One curl run of TLS transfers."""

    ok: int
    """Transfers that got their whole body."""
    seconds: float
    bytes: int
    cpu_s: float
    """CPU seconds the proxy's processes used meanwhile (0 for the direct run)."""
    client_cpu_s: float
    """CPU seconds of the curl client: near ``seconds`` means the client (one core)
    was the bottleneck, not the proxy."""
    main_cpu_s: float = 0.0
    """Of ``cpu_s``, the proxy's main process (``Proc.cpu_s(main_only=True)``): linewarden's
    records pass there on their way to the store, its workers do the rest."""
    origin_cpu_s: float = 0.0
    """CPU seconds of the origin (nginx) meanwhile. With the client and the proxy it
    makes the machine's CPU per GB: on two shared cores the bulk rate follows that sum,
    and how a proxy relays changes what its two ends pay (proxy/relay.py, ``RelayMode``)."""

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def tls_load(proxy: Proc | None, origin_port: int, path: str, size: int, transfers: int, parallel: int,
             work: Path, origin: Proc | None = None) -> TlsRun:
    """``transfers`` HTTPS GETs of ``path`` (``size`` bytes), each on a new connection
    (``Connection: close``, no session resumption: a full handshake and an SNI decision each),
    ``parallel`` at a time, by curl (C: the client is not the bottleneck) through the
    proxy's CONNECT (``proxy`` None: straight to the origin).

    Every target gets the same client: one curl process, the same URL list and
    parallelism, and the same origin (``--connect-to`` makes the CONNECT target
    127.0.0.1:origin_port; the SNI stays www.bench.example)."""
    cfg = work / "curl.cfg"
    url = f"https://www.bench.example:{origin_port}{path}"
    cfg.write_text("".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(transfers)))
    cmd = ["curl", "-s", "-k", "-Z", "--parallel-max", str(parallel), "--parallel-immediate", "--no-sessionid",
           "-H", "Connection: close", "--connect-to", f"www.bench.example:{origin_port}:127.0.0.1:{origin_port}",
           "-w", "%{size_download}\n", "-K", str(cfg)]
    if proxy is not None:
        cmd[1:1] = ["-x", f"http://127.0.0.1:{proxy.tls_port}"]
    cpu = proxy.cpu_s() if proxy is not None else 0.0
    main_cpu = proxy.cpu_s(main_only=True) if proxy is not None else 0.0
    origin_cpu = origin.cpu_s() if origin is not None else 0.0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    elapsed = time.monotonic() - t
    cpu = proxy.cpu_s() - cpu if proxy is not None else 0.0
    main_cpu = proxy.cpu_s(main_only=True) - main_cpu if proxy is not None else 0.0
    origin_cpu = origin.cpu_s() - origin_cpu if origin is not None else 0.0
    kids_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = kids_after.ru_utime + kids_after.ru_stime - kids.ru_utime - kids.ru_stime
    sizes = [int(x) for x in out.split() if x.isdigit()]
    ok = sum(1 for x in sizes if x == size)
    if ok < transfers:
        log(f"  warning: {transfers - ok} of {transfers} TLS transfers failed or came back short")
    return TlsRun(ok, elapsed, sum(sizes), cpu, client, main_cpu, origin_cpu)


def idle_memory(proc: Proc, origin_port: int, n: int = 1000) -> tuple[float, float]:
    """RSS (MB) before and with ``n`` idle keep-alive client connections, each after one request."""
    before = proc.rss_mb()
    socks = []
    req = f"GET http://127.0.0.1:{origin_port}/1k.html HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n".encode()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
        s.sendall(req)
        socks.append(s)
    for s in socks:
        got = b""
        while b"</html>" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    time.sleep(1.0)
    during = proc.rss_mb()
    for s in socks:
        s.close()
    return before, during


# -- instructions (callgrind) -------------------------------------------------------------------

INSTR_WARM = 50
"""Connections before the count starts: imports, first-use caches and the memos filled."""


def instructions_per_conn(root: Path, origin: Proc, size: int, n: int, work: Path) -> float:
    """Instructions (user space, callgrind) the fast path of the checkout at ``root`` runs per
    TLS passthrough connection: in-process, one loop (as in a worker), its records encoded to
    a channel as a worker's are, ``n`` connections by curl as in the conn/s run.

    Wall-clock CPU on this shared 2-core machine moves by ±30 % from round to round (the
    same code measured 0.42-0.60 ms a connection within one run); an instruction count of
    the same work moves by under 1 %, so it tells a change of a few per cent that the rates
    cannot. It leaves out the kernel's share (about a third of a worker's CPU here), the
    main process and cache effects: a complement to the rounds, not a replacement."""
    out = work / f"callgrind-{root.name}-{time.monotonic_ns()}.out"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
           PY, str(Path(__file__).resolve()), "--instructions-child", str(root.resolve()),
           str(origin.tls_port), str(size), str(n), str(work)]
    subprocess.run(cmd, capture_output=True, timeout=1800, check=True)
    total = 0
    for f in work.glob(out.name + ".*"):  # the dump of the counted part (``callgrind_control -d``)
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("summary:"):
                total = int(line.split()[1])
    counted = int((work / "instructions-counted").read_text())
    return total / counted if counted else 0.0


def _instructions_child(root: str, tls_port: int, size: int, n: int, work: Path) -> None:
    """The process ``instructions_per_conn`` runs under callgrind."""
    sys.path.insert(0, root)
    import asyncio

    import uvloop

    from linewarden.workers import ChannelSink, _SinkProtocol, freeze_long_lived
    from proxy.fastpath import FastPath, FastPathConfig
    from rules.engine import Engine

    assert Path(sys.modules["proxy.fastpath"].__file__ or "").is_relative_to(root)

    async def run() -> None:
        rules = work / f"instr-rules-{os.getpid()}"
        write_rules(rules, make_keywords(50))
        a, b = socket.socketpair()
        drain = subprocess.Popen(["cat"], stdin=b.fileno(), stdout=subprocess.DEVNULL)
        b.close()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(_SinkProtocol, a)
        sink = ChannelSink(transport, True)  # type: ignore[arg-type]
        fp = FastPath(Engine.from_dir(rules), sink.submit, FastPathConfig(listen=("127.0.0.1", 0)))
        await fp.start()
        assert fp.address is not None
        freeze_long_lived()
        me = str(os.getpid())
        url = f"https://www.bench.example:{tls_port}/1k.html"
        try:
            for count, measured in ((INSTR_WARM, False), (n, True)):
                cfg = work / f"instr-curl-{os.getpid()}.cfg"
                cfg.write_text("".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(count)))
                if measured:
                    subprocess.run(["callgrind_control", "-z", me], capture_output=True)
                    subprocess.run(["callgrind_control", "-i", "on", me], capture_output=True)
                curl = await asyncio.create_subprocess_exec(
                    "curl", "-s", "-k", "-Z", "--parallel-max", str(TLS_PARALLEL), "--parallel-immediate",
                    "--no-sessionid", "-x", f"http://127.0.0.1:{fp.address[1]}", "-H", "Connection: close",
                    "--connect-to", f"www.bench.example:{tls_port}:127.0.0.1:{tls_port}",
                    "-w", "%{size_download}\n", "-K", str(cfg), stdout=subprocess.PIPE)
                got, _ = await curl.communicate()
                while fp.stats.active:
                    await asyncio.sleep(0.01)
                sink.flush()
                await asyncio.sleep(0.1)
                if measured:
                    subprocess.run(["callgrind_control", "-d", me], capture_output=True)
                    subprocess.run(["callgrind_control", "-i", "off", me], capture_output=True)
                    ok = sum(1 for x in got.split() if int(x) == size)
                    (work / "instructions-counted").write_text(str(ok))
        finally:
            await fp.stop()
            transport.close()
            drain.kill()
            drain.wait()

    uvloop.run(run())


def print_instructions(args, origin: Proc, work: Path) -> None:  # type: ignore[no-untyped-def]
    size = len((work / "www" / "1k.html").read_bytes())
    roots = [("linewarden", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    got: dict[str, list[float]] = {}
    for r in range(args.instr_rounds):
        for name, root in roots if r % 2 == 0 else roots[::-1]:
            ir = instructions_per_conn(root, origin, size, args.instructions, work)
            got.setdefault(name, []).append(ir)
            log(f"{name:>11} round {r + 1}: {ir:,.0f} instructions a TLS passthrough connection")
    print(f"\nFast path in one process under callgrind ({args.instructions} TLS passthrough connections by curl "
          f"after {INSTR_WARM}, records encoded to a channel; user-space instructions, kernel not counted):")
    for name, irs in got.items():
        print(f"  {name:>11}: {_median(irs):,.0f} a connection [{' '.join(f'{x:,.0f}' for x in irs)}]")
    if "baseline" in got:
        print(f"  linewarden/baseline: {_median(got['linewarden']) / _median(got['baseline']):.3f}")


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    ap.add_argument("--keywords", type=int, default=10_000, help="keywords / phrases (default 10000)")
    ap.add_argument("--tls-conns", type=int, default=2000, help="TLS connections per run (default 2000)")
    ap.add_argument("--skip", default="", help="comma-separated: http (the wrk pages),e2guardian,squid,tls,memory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per page; the best counts")
    ap.add_argument("--tls-rounds", type=int, default=3,
                    help="alternating TLS rounds; medians count (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="linewarden http.workers (default 2: both cores)")
    ap.add_argument("--relay", choices=("auto", "splice", "copy"), default=None,
                    help="linewarden http.relay (default: the product's, auto; here every end is on "
                         "this machine, so auto copies; a gateway between two other hosts splices)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout of linewarden (say `git worktree add /tmp/base HEAD`, its "
                         "compiled modules built or copied there) run as 'baseline' in the page and TLS "
                         "rounds, alternating with this one under the same load: an A/B of a change")
    ap.add_argument("--squid-workers", type=int, default=None,
                    help="squid SMP workers (default: as many as linewarden's, so both get the same "
                         "parallelism, and the same share of a busy machine's CPU)")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="instead of the rounds: count the instructions (valgrind's callgrind) the fast "
                         "path runs per TLS passthrough connection over N connections, for this checkout "
                         "and --baseline: an A/B that the shared machine's load does not move")
    ap.add_argument("--instr-rounds", type=int, default=2, help="alternating --instructions runs (default 2)")
    ap.add_argument("--instructions-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.instructions_child:
        root, port, size, n, child_work = args.instructions_child
        _instructions_child(root, int(port), int(size), int(n), Path(child_work))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        log("needs wrk and nginx: apt-get install -y wrk nginx-light")
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard), hard))
    work = Path(tempfile.mkdtemp(prefix="lw-bench-"))
    os.chmod(work, 0o755)
    procs: list[Proc] = []
    try:
        keywords = make_keywords(args.keywords)
        origin = start_nginx(work)
        procs.append(origin)
        if args.instructions:
            if shutil.which("valgrind") is None:
                log("--instructions needs valgrind: apt-get install -y valgrind")
                return 2
            print_instructions(args, origin, work)
            return 0
        # The pages must be clean: a benchmark of block pages would measure something else.
        from rules.engine import Engine

        write_rules(work / "check-rules", keywords)
        engine = Engine.from_dir(work / "check-rules")
        for name in PAGES:
            page = (work / "www" / f"{name}.html").read_bytes()
            v = engine.http_response(200, [(b"Content-Type", b"text/html; charset=utf-8")], page)
            assert v.action == "allow", (name, v.rule_ids)
        lw = start_linewarden(work, keywords, args.workers, args.relay)
        procs.append(lw)
        baseline = None
        if args.baseline is not None:
            baseline = start_linewarden(work, keywords, args.workers, args.relay, root=args.baseline.resolve(),
                                        name="baseline")
            procs.append(baseline)
        peers: dict[str, Proc] = {}
        if "e2guardian" not in skip and (e2g := start_e2guardian(work, keywords)):
            peers["e2guardian"] = e2g
            procs.append(e2g)
        if args.squid_workers is None:
            args.squid_workers = args.workers
        if "squid" not in skip and (sq := start_squid(work, args.squid_workers)):
            peers["squid"] = sq
            procs.append(sq)

        for name, p in [("linewarden", lw)] + [(n, q) for n, q in peers.items() if n == "e2guardian"]:
            if "http" in skip:
                break
            # Scanning really is on: the probe page must not come through.
            probe = subprocess.run(["curl", "-s", "-x", f"http://127.0.0.1:{p.port}",
                                    f"http://127.0.0.1:{origin.port}/probe.html"], capture_output=True).stdout
            ok = PROBE_KEYWORD.encode() not in probe and probe
            log(f"{name}: probe page {'blocked' if ok else 'NOT BLOCKED'} ({len(probe)} bytes back)")
        time.sleep(3)  # let every proxy finish starting (list loading, workers) before measuring
        targets: list[tuple[str, int, bool]] = [("direct", origin.port, False), ("linewarden", lw.port, True)]
        if baseline is not None:
            targets.append(("baseline", baseline.port, True))
        targets += [(n, p.port, True) for n, p in peers.items()]
        results: dict[tuple[str, str], tuple[float, float]] = {}
        host = f"127.0.0.1:{origin.port}"
        for page in PAGES if "http" not in skip else ():
            # Rounds alternate the targets and the best round counts: on a shared machine
            # a burst of someone else's load then hits every proxy alike.
            for _ in range(args.rounds):
                for name, port, via_proxy in targets:
                    url = f"http://{host}/{page}.html" if via_proxy else f"/{page}.html"
                    # Fewer connections for big pages: a scanning peer at a few MB/s would
                    # otherwise time out every request and report nothing.
                    conns = max(args.threads, args.connections * PAGE_CONNS[page] // 32)
                    got = wrk(port, url, host, args.duration, conns, args.threads, work)
                    log(f"{name:>11} {page:>4}: {got[0]:10.0f} req/s {got[1]:9.1f} MB/s")
                    if got[0] >= results.get((name, page), (-1.0, 0.0))[0]:
                        results[(name, page)] = got

        tls: dict[str, list[tuple[TlsRun, TlsRun]]] = {}
        if "tls" not in skip and shutil.which("curl"):
            assert origin.tls_port is not None
            small = len((work / "www" / "1k.html").read_bytes())
            tls_targets: list[tuple[str, Proc | None]] = [("direct", None), ("linewarden", lw)]
            if baseline is not None:
                tls_targets.append(("baseline", baseline))
            if "squid" in peers:
                tls_targets.append(("squid", peers["squid"]))
            for r in range(args.tls_rounds):
                # Rounds alternate the order, and ratios are taken within a round: a burst
                # of someone else's load then hits both proxies alike.
                order = tls_targets[:1] + (tls_targets[1:] if r % 2 == 0 else tls_targets[:0:-1])
                for name, proc in order:
                    conns = tls_load(proc, origin.tls_port, "/1k.html", small, args.tls_conns, TLS_PARALLEL, work)
                    bulk = tls_load(proc, origin.tls_port, "/bulk.bin", BULK_BYTES, BULK_TRANSFERS,
                                    BULK_PARALLEL, work, origin)
                    tls.setdefault(name, []).append((conns, bulk))
                    log(f"{name:>11} TLS round {r + 1}: {conns.per_s:8.0f} conn/s "
                        f"({_cpu_ms(conns):5.2f} ms CPU/conn, curl busy {conns.client_cpu_s / conns.seconds:.2f}) "
                        f"{bulk.mb_s:9.1f} MB/s ({_cpu_per_gb(bulk):5.2f} s CPU/GB, "
                        f"curl busy {bulk.client_cpu_s / bulk.seconds:.2f}, "
                        f"machine {_machine_cpu_per_gb(bulk):5.2f} s CPU/GB)")

        mem: dict[str, tuple[float, float]] = {}
        if "memory" not in skip:
            for name, p in [("linewarden", lw)] + list(peers.items()):
                mem[name] = idle_memory(p, origin.port)
                log(f"{name:>11} memory: {mem[name][0]:.1f} MB idle, {mem[name][1]:.1f} MB with 1,000 idle connections")

        lw.stop()  # SIGTERM: the writer commits everything before the records are counted
        print_report(args, results, tls, mem, (["baseline"] if baseline else []) + list(peers), keywords,
                     work / "lw-store")
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else ("inf" if a > 0 else "n/a")


def print_report(args, results, tls, mem, peers, keywords, lw_store) -> None:  # type: ignore[no-untyped-def]
    print(f"\nbench_proxy: {len(keywords)} keywords, wrk -t{args.threads} -c{args.connections} (64k: /2, 1m: /8) "
          f"-d{args.duration}s, linewarden http.workers={args.workers}, squid workers={args.squid_workers}, "
          f"{os.cpu_count()} CPUs, loopback")
    cols = ["direct", "linewarden"] + peers
    base = " | lw/base" if "baseline" in peers else ""
    if results:
        print(f"{'page':>5} | " + " | ".join(f"{c:>22}" for c in cols) + " | lw/e2g | lw/squid" + base)
    for page in PAGES if results else ():
        cells = []
        for c in cols:
            rps, mbs = results[(c, page)]
            cells.append(f"{rps:8.0f} r/s {mbs:7.1f} MB/s")
        lw = results[("linewarden", page)][0]
        r_e = _ratio(lw, results[("e2guardian", page)][0]) if "e2guardian" in peers else "n/a"
        r_s = _ratio(lw, results[("squid", page)][0]) if "squid" in peers else "n/a"
        r_b = f" | {_ratio(lw, results[('baseline', page)][0]):>7}" if base else ""
        print(f"{page:>5} | " + " | ".join(f"{c:>22}" for c in cells) + f" | {r_e:>6} | {r_s:>8}" + r_b)
    if tls:
        print_tls(args, tls)
    if mem:
        print("\nResident memory (all processes of the proxy):")
        for name, (before, during) in mem.items():
            print(f"  {name:>11}: {before:7.1f} MB idle, {during:7.1f} MB with 1,000 idle keep-alive connections")
    try:
        from storage.query import query

        n = sum(1 for _ in query(lw_store, kind="http"))
        print(f"\nlinewarden recorded {n} http records in its store during the run.")
        if "linewarden" in tls:
            tls_records = list(query(lw_store, kind="tls"))
            conns = [c for c in query(lw_store, kind="conn") if c.service == "tls"]
            through = sum(c.ok + b.ok for c, b in tls["linewarden"])
            bad = sum(1 for t in tls_records if t.action != "allow" or not t.nat_port or not t.sni)
            print(f"linewarden TLS: {through} transfers, {len(tls_records)} tls records ({bad} without "
                  f"sni/nat_port or not allowed), {len(conns)} tls conn records, "
                  f"{sum(c.bytes_down for c in conns) / 1e6:.1f} MB down / "
                  f"{sum(c.bytes_up for c in conns) / 1e6:.1f} MB up recorded")
    except Exception as e:  # the report is still useful without the count
        print(f"\n(could not count linewarden's records: {e})")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _cpu_ms(run: TlsRun) -> float:
    return run.cpu_s * 1000 / run.ok if run.ok else 0.0


def _cpu_per_gb(run: TlsRun) -> float:
    return run.cpu_s / (run.bytes / 1e9) if run.bytes else 0.0


def _machine_cpu_per_gb(run: TlsRun) -> float:
    """Proxy + curl + nginx CPU per GB: what the bulk rate follows on shared cores."""
    return (run.cpu_s + run.client_cpu_s + run.origin_cpu_s) / (run.bytes / 1e9) if run.bytes else 0.0


def print_tls(args, tls) -> None:  # type: ignore[no-untyped-def]
    rounds = len(next(iter(tls.values())))
    relay = args.relay or "auto"
    print(f"\nTLS passthrough (explicit CONNECT, SNI decision, http.relay = {relay}; curl clients; median of {rounds} "
          f"alternating rounds; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}):")
    print(f"  new connections: {args.tls_conns} per round, {TLS_PARALLEL} in parallel, each a full handshake "
          f"+ 1 KB GET; bulk: {BULK_TRANSFERS} x {BULK_BYTES >> 20} MiB, {BULK_PARALLEL} in parallel")
    for name, runs in tls.items():
        cps = _median([c.per_s for c, _ in runs])
        mbs = _median([b.mb_s for _, b in runs])
        main = _median([c.main_cpu_s * 1000 / c.ok if c.ok else 0.0 for c, _ in runs])
        cpu = "" if name == "direct" else (f"; proxy CPU {_median([_cpu_ms(c) for c, _ in runs]):.2f} ms/conn "
                                           f"(main process {main:.3f}), "
                                           f"{_median([_cpu_per_gb(b) for _, b in runs]):.2f} s/GB")
        busy = (f"curl busy {_median([c.client_cpu_s / c.seconds for c, _ in runs]):.2f}"
                f"/{_median([b.client_cpu_s / b.seconds for _, b in runs]):.2f} cores")
        machine = _median([_machine_cpu_per_gb(b) for _, b in runs])
        print(f"  {name:>11}: {cps:8.0f} new conn/s, {mbs:8.1f} MB/s bulk ({busy}{cpu}; "
              f"machine {machine:.2f} s CPU/GB)")
    for peer in ("squid", "baseline"):
        if peer in tls and "linewarden" in tls:
            print_tls_ratios(tls, peer)


def print_tls_ratios(tls, peer: str) -> None:  # type: ignore[no-untyped-def]
    """linewarden against ``peer``: ratios taken within each round, then their median."""
    pairs = list(zip(tls["linewarden"], tls[peer]))
    conn_r = [lc.per_s / sc.per_s for (lc, _), (sc, _) in pairs]
    bulk_r = [lb.mb_s / sb.mb_s for (_, lb), (_, sb) in pairs]
    print(f"  ratio linewarden/{peer} (median of per-round ratios): conn/s {_median(conn_r):.2f} "
          f"[{' '.join(f'{x:.2f}' for x in conn_r)}], bulk {_median(bulk_r):.2f} "
          f"[{' '.join(f'{x:.2f}' for x in bulk_r)}]")
    # CPU per unit of work does not depend on how busy the machine is; the rates do
    # (and on a busy machine the scheduler's per-process share favours a proxy that
    # runs several processes), so the rates' ratio is only telling on a quiet machine.
    conn_c = [_cpu_ms(lc) / _cpu_ms(sc) for (lc, _), (sc, _) in pairs if _cpu_ms(sc)]
    bulk_c = [_cpu_per_gb(lb) / _cpu_per_gb(sb) for (_, lb), (_, sb) in pairs if _cpu_per_gb(sb)]
    machine_c = [_machine_cpu_per_gb(lb) / _machine_cpu_per_gb(sb) for (_, lb), (_, sb) in pairs
                 if _machine_cpu_per_gb(sb)]
    print(f"  proxy CPU per unit linewarden/{peer} (lower is better): per connection {_median(conn_c):.2f} "
          f"[{' '.join(f'{x:.2f}' for x in conn_c)}], per GB {_median(bulk_c):.2f}; "
          f"machine (proxy + curl + nginx) per GB {_median(machine_c):.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
