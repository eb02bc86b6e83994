"""Issue 7 round trip on loopback: import → pack → verify → push to a running
`linewarden run` (DNS shim and HTTP proxy as worker processes) → the new domain and
phrase are blocked without a restart; bad pushes are refused and change nothing.

Everything listens on 127.0.0.1 with free ports: a loopback authoritative-only zone
(tests/proxy/test_dns_shim.py's ``Zone``) as DNS upstream and a loopback HTTP origin.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord

from storage.query import query
from storage.records import Alarm, Dns, Http, Maintenance
from tests.proxy.test_dns_shim import Zone, exchange, make_query

ROOT = Path(__file__).resolve().parents[2]
PAGE = b"<html><body>Tonight: poker at the casino, xxx prizes</body></html>"


def lw(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linewarden", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        for _ in range(100):  # bounded keep-alive
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(PAGE) + PAGE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def fetch(proxy_port: int, origin_port: int, path: str = "/page") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        w.write(f"GET http://127.0.0.1:{origin_port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n"
                f"Connection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            return await r.read()
    finally:
        w.close()


def status_of(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def make_rules(tmp: Path) -> Path:
    d = tmp / "maint"
    lists = tmp / "lists"
    lists.mkdir()
    (lists / "hosts.txt").write_text("# ads\n0.0.0.0 ads.lw.test\n")
    assert lw("rules", "import", "--format", "hosts", str(lists / "hosts.txt"),
              "--category", "ads", "--into", str(d)).returncode == 0
    return d


@pytest.mark.timeout(300)
def test_import_pack_verify_push_blocks_without_restart(tmp_path: Path) -> None:
    maint = make_rules(tmp_path)
    keys = tmp_path / "keys"
    assert lw("keys", "init", "--dir", str(keys)).returncode == 0
    other = tmp_path / "other-keys"
    assert lw("keys", "init", "--dir", str(other)).returncode == 0
    store = tmp_path / "store"
    sock = tmp_path / "control.sock"
    dns_port, http_port = free_port(), free_port()

    async def scenario() -> dict[str, object]:
        zone = Zone()
        await zone.start()
        origin = await asyncio.start_server(origin_handler, "127.0.0.1", 0)
        origin_port = origin.sockets[0].getsockname()[1]
        cfg = tmp_path / "lw.toml"
        cfg.write_text("\n".join([
            f'[rules]\ndir = "{maint}"\npubkeys = ["{keys}/signing.pub"]\ncontrol_socket = "{sock}"',
            f'[store]\ndir = "{store}"\ncommit_interval_ms = 20',
            f'[http]\nlisten = "127.0.0.1:{http_port}"\nworkers = 1',
            f'[dns]\nlisten = "127.0.0.1:{dns_port}"\nupstreams = ["{zone.address[0]}:{zone.address[1]}"]\n'
            "workers = 1",  # the answer cache stays on: a swap must not be hidden by it
            '[[identity.binding]]\nip = "127.0.0.1"\naccount = "lab"',
        ]) + "\n")
        log = open(tmp_path / "run.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "linewarden", "run", "--config", str(cfg)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        out: dict[str, object] = {}
        try:
            deadline = time.monotonic() + 90
            while b"linewarden: store" not in (tmp_path / "run.log").read_bytes():
                assert proc.poll() is None, (tmp_path / "run.log").read_text()
                assert time.monotonic() < deadline, "linewarden run did not start"
                await asyncio.sleep(0.1)
            assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600

            async def ask(name: str) -> int:
                return DNSRecord.parse(await exchange(("127.0.0.1", dns_port), make_query(name))).header.rcode

            # Before: the new names and the page pass.
            assert await ask("www.lw.test") == 0
            assert await ask("ads.lw.test") == RCODE.NXDOMAIN  # the imported hosts entry
            assert status_of(await fetch(http_port, origin_port)) == 200

            # The maintainer imports more lists, packs and verifies v2.
            lists = tmp_path / "lists"
            (lists / "more.txt").write_text("=www.lw.test\n")
            (lists / "phrases.txt").write_text("<poker>,<casino>\n<nothere><5>\n")
            run = lw("rules", "import", "--format", "domains", str(lists / "more.txt"),
                     "--category", "ads", "--into", str(maint))
            assert run.returncode == 0, run.stdout + run.stderr
            run = lw("rules", "import", "--format", "e2guardian", str(lists / "phrases.txt"),
                     "--category", "gambling", "--into", str(maint))
            assert run.returncode == 0, run.stdout + run.stderr
            import tomllib

            out["version"] = v = tomllib.loads((maint / "ruleset.toml").read_text())["version"]
            assert v > 1
            good = tmp_path / "v.bundle"
            assert lw("rules", "pack", str(maint), "--key", str(keys), "-o", str(good)).returncode == 0
            run = lw("rules", "verify", str(good), "--pubkey", str(keys / "signing.pub"))
            assert run.returncode == 0 and "OK" in run.stdout, run.stderr

            # A bundle signed by an untrusted key is refused; nothing changes.
            bad_sig = tmp_path / "badsig.bundle"
            assert lw("rules", "pack", str(maint), "--key", str(other), "-o", str(bad_sig)).returncode == 0
            run = lw("rules", "push", str(bad_sig), "--socket", str(sock))
            assert run.returncode == 2 and "bad signature" in run.stderr, run.stderr
            assert await ask("www.lw.test") == 0

            # The good one: active without a restart, through both workers.
            run = lw("rules", "push", str(good), "--socket", str(sock))
            assert run.returncode == 0, run.stderr
            out["push"] = run.stdout
            assert await ask("www.lw.test") == RCODE.NXDOMAIN
            blocked = await fetch(http_port, origin_port)
            assert status_of(blocked) == 451, blocked[:300]

            # The same bundle again (not newer), then an invalid rule set: refused, v2 stays.
            run = lw("rules", "push", str(good), "--socket", str(sock))
            assert run.returncode == 2 and "not higher than the running version" in run.stderr
            (maint / "domains.tsv").write_text((maint / "domains.tsv").read_text() + "broken-row\n")
            bad = tmp_path / "invalid.bundle"
            _tamper_pack(maint, keys, bad)
            run = lw("rules", "push", str(bad), "--socket", str(sock))
            assert run.returncode == 2 and "invalid rule set" in run.stderr, run.stderr
            assert await ask("www.lw.test") == RCODE.NXDOMAIN

            # Rollback to v1 (the managed directory kept it), then SIGHUP re-reads rules.dir.
            run = lw("rules", "rollback", "--socket", str(sock))
            assert run.returncode == 0, run.stderr
            assert await ask("www.lw.test") == 0
            assert status_of(await fetch(http_port, origin_port)) == 200
            (maint / "domains.tsv").write_text((maint / "domains.tsv").read_text().replace("broken-row\n", ""))
            os.kill(proc.pid, signal.SIGHUP)
            for _ in range(100):
                if await ask("www.lw.test") == RCODE.NXDOMAIN:
                    break
                await asyncio.sleep(0.1)
            assert await ask("www.lw.test") == RCODE.NXDOMAIN
            proc.send_signal(signal.SIGTERM)
            for _ in range(300):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            out["rc"] = proc.returncode
        finally:
            if proc.poll() is None:
                proc.kill()
            origin.close()
            await zone.stop()
        return out

    out = asyncio.run(scenario())
    assert out["rc"] == 0, (tmp_path / "run.log").read_text()
    recs = list(query(store))
    maint_recs = [r for r in recs if isinstance(r, Maintenance) and (r.operation or "").startswith("rules.")]
    ops = [(r.operation, r.result.split(":")[0], r.ruleset_version) for r in maint_recs]
    v = out["version"]
    assert ops == [("rules.push", "rejected", 1), ("rules.push", "ok", v),
                   ("rules.push", "rejected", v), ("rules.push", "rejected", v),
                   ("rules.rollback", "ok", 1), ("rules.reload", "ok", v)], ops
    assert all(r.admin and "uid" in r.admin for r in maint_recs[:-1])
    assert {r.alarm_kind for r in recs if isinstance(r, Alarm)} >= {"rules_reloaded", "rules_rejected"}
    # Every record names the version that decided it: v1, then v2 exactly after the push.
    dns_versions = [(r.qname, r.action, r.ruleset_version) for r in recs if isinstance(r, Dns)]
    assert any(q.rstrip(".") == "www.lw.test" and a == "block" and rv == v for q, a, rv in dns_versions)
    assert any(q.rstrip(".") == "www.lw.test" and a == "allow" and rv == 1 for q, a, rv in dns_versions)
    http = [(r.action, r.ruleset_version) for r in recs if isinstance(r, Http)]
    assert ("block", v) in http and ("allow", 1) in http


def _tamper_pack(maint: Path, keys: Path, out: Path) -> None:
    """A correctly signed bundle of an invalid rule set, written by hand: ``rules pack``
    refuses to pack one, but a gateway must not rely on that."""
    import hashlib
    import io
    import tarfile
    import tomllib

    from linewarden import keys as k

    head = tomllib.loads((maint / "ruleset.toml").read_text())
    files = [f for f in ("ruleset.toml", "domains.tsv", "phrases.tsv") if (maint / f).exists()]
    manifest = {"format": "linewarden-rules", "format_version": 1, "name": head["name"],
                "version": head["version"] + 1, "created": "2026-01-01T00:00:00Z",
                "files": {f: hashlib.sha256((maint / f).read_bytes()).hexdigest() for f in files}}
    body = json.dumps(manifest).encode()
    pair = k.load(keys)
    sig = json.dumps({"key": pair.fingerprint, "signature": pair.sign(body)}).encode()
    with tarfile.open(out, "w:gz") as tar:
        for name, data in [("manifest.json", body), ("manifest.sig", sig)] + [
                (f"rules/{f}", (maint / f).read_bytes()) for f in files]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
