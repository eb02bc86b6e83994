"""Reload under load (issue 7): 200 keep-alive connections stay busy through the proxy of
a running `linewarden run` while 20 bundles are pushed (some invalid, one with a bad
signature, one older): no request fails, the bad ones are refused with clear errors, and
the rule-set version in the records changes exactly at the accepted pushes.

Loopback only: a loopback origin, a loopback authoritative zone, free ports. Bounded:
at most ``MAX_S`` seconds, each client at most ``MAX_REQUESTS_PER_CONN`` requests.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from linewarden import keys
from linewarden.control import request
from rules.bundle import pack
from storage.query import query
from storage.records import Http, Maintenance
from tests.e2e.test_rules_push import ROOT, _tamper_pack, free_port
from tests.proxy.test_dns_shim import Zone

CLIENTS = 200
MAX_S = 180.0
MAX_REQUESTS_PER_CONN = 2000
BODY = b"<html><body>an ordinary page</body></html>"


async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        for _ in range(MAX_REQUESTS_PER_CONN + 1):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n"
                         % len(BODY) + BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def ruleset(d: Path, version: int, domain: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ruleset.toml").write_text(f'name = "load"\nversion = {version}\n[categories.ads]\naction = "block"\n')
    (d / "domains.tsv").write_text(f"id\tcategory\tdomain\nD1\tads\t{domain}\n")
    return d


@pytest.mark.timeout(400)
def test_twenty_pushes_under_200_busy_connections(tmp_path: Path) -> None:
    pair = keys.generate(tmp_path / "keys")
    stranger = keys.generate(tmp_path / "stranger")
    now = datetime.now(timezone.utc)
    # 20 pushes: versions 2..15 accepted, with refusals in between.
    plan: list[tuple[Path, bool]] = []
    version = 1
    for i in range(20):
        out = tmp_path / f"b{i}"
        if i == 5:  # bad signature
            pack(ruleset(tmp_path / f"s{i}", version + 1, f"d{i}.test"), out, stranger, now=now)
            plan.append((out, False))
        elif i == 9:  # older version
            pack(ruleset(tmp_path / f"s{i}", version - 1, f"d{i}.test"), out, pair, now=now)
            plan.append((out, False))
        elif i in (3, 12, 16):  # invalid rule set, correctly signed
            d = ruleset(tmp_path / f"s{i}", version, f"d{i}.test")
            (d / "domains.tsv").write_text("id\tcategory\tdomain\nD1\tnope\tx.test\n")
            _tamper_pack(d, tmp_path / "keys", out)
            plan.append((out, False))
        else:
            version += 1
            pack(ruleset(tmp_path / f"s{i}", version, f"d{i}.test"), out, pair, now=now)
            plan.append((out, True))
    store, sock = tmp_path / "store", tmp_path / "control.sock"
    http_port = free_port()
    rules = ruleset(tmp_path / "initial", 1, "initial.test")

    async def scenario() -> tuple[int, int, list[dict], int]:
        zone = Zone()
        await zone.start()
        srv = await asyncio.start_server(origin, "127.0.0.1", 0, backlog=512)
        oport = srv.sockets[0].getsockname()[1]
        cfg = tmp_path / "lw.toml"
        cfg.write_text(
            f'[rules]\ndir = "{rules}"\npubkeys = ["{tmp_path / "keys"}"]\ncontrol_socket = "{sock}"\n'
            f'[store]\ndir = "{store}"\ncommit_interval_ms = 50\n'
            f'[http]\nlisten = "127.0.0.1:{http_port}"\nworkers = 2\n'
            f'[dns]\nlisten = "127.0.0.1:0"\nupstreams = ["{zone.address[0]}:{zone.address[1]}"]\n')
        log = open(tmp_path / "run.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "linewarden", "run", "--config", str(cfg)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        ok = failed = 0
        answers: list[dict] = []
        stop = asyncio.Event()
        deadline = time.monotonic() + MAX_S

        async def client() -> None:
            nonlocal ok, failed
            r, w = await asyncio.open_connection("127.0.0.1", http_port)
            try:
                for _ in range(MAX_REQUESTS_PER_CONN):
                    if stop.is_set() or time.monotonic() > deadline:
                        break
                    w.write(f"GET http://127.0.0.1:{oport}/p HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n".encode())
                    try:
                        async with asyncio.timeout(30):
                            head = await r.readuntil(b"\r\n\r\n")
                            n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                            body = await r.readexactly(n)
                    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, IndexError):
                        failed += 1
                        return
                    if head.startswith(b"HTTP/1.1 200") and body == BODY:
                        ok += 1
                    else:
                        failed += 1
                    await asyncio.sleep(0.01)
            finally:
                w.close()

        try:
            while b"linewarden: store" not in (tmp_path / "run.log").read_bytes():
                assert proc.poll() is None, (tmp_path / "run.log").read_text()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            clients = [asyncio.create_task(client()) for _ in range(CLIENTS)]
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            for path, _ in plan:
                data = path.read_bytes()
                answers.append(await loop.run_in_executor(None, lambda d=data: request(sock, "push", d)))
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*clients)
            proc.send_signal(signal.SIGTERM)
            for _ in range(300):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            rc = proc.returncode
        finally:
            if proc.poll() is None:
                proc.kill()
            srv.close()
            await zone.stop()
        return ok, failed, answers, rc

    ok, failed, answers, rc = asyncio.run(scenario())
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert failed == 0 and ok > CLIENTS * 10, (ok, failed)
    assert [a["ok"] for a in answers] == [accepted for _, accepted in plan], answers
    errors = {i: a["errors"][0] for i, a in enumerate(answers) if not a["ok"]}
    assert "bad signature" in errors[5] and "not higher than the running version" in errors[9]
    assert all("invalid rule set" in errors[i] and "unknown category 'nope'" in errors[i] for i in (3, 12, 16))
    accepted = [1] + [a["version"] for a in answers if a["ok"]]
    assert accepted == list(range(1, 17))
    recs = list(query(store))
    pushes = [r for r in recs if isinstance(r, Maintenance) and r.operation == "rules.push"]
    assert [r.result == "ok" for r in pushes] == [accepted for _, accepted in plan]
    # The version the records carry: only accepted ones, and never going back in time
    # on a connection (each transaction reads the Engine once).
    https = [r for r in recs if isinstance(r, Http)]
    assert len(https) >= ok
    assert {r.ruleset_version for r in https} <= set(accepted)
    assert {1, 16} <= {r.ruleset_version for r in https}
    per_conn: dict[str, list[int]] = {}
    for r in sorted(https, key=lambda r: r.ts):
        per_conn.setdefault(r.uid, []).append(r.ruleset_version or 0)
    assert all(v == sorted(v) for v in per_conn.values())
