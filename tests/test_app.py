"""linewarden/app.py and linewarden/workers.py: the composition on loopback.

The DNS service runs as worker processes that send their records through the
channel to the one writer; `linewarden run` stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord

from linewarden.app import App
from linewarden.config import config_from_mapping
from storage.query import query
from storage.records import Dns
from tests.conftest import kill_first_worker_and_await_restart
from tests.proxy.test_dns_shim import Zone, exchange, make_query, write_rules

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, upstream: tuple[str, int], workers: int, port: int = 0) -> dict:
    return {
        "rules": {"dir": str(write_rules(tmp_path / "rules"))},
        "store": {"dir": str(tmp_path / "store"), "commit_interval_ms": 20},
        "http": {"enabled": False},
        "dns": {"listen": f"127.0.0.1:{port}", "upstreams": [f"{upstream[0]}:{upstream[1]}"],
                "workers": workers},
        "identity": {"binding": [{"ip": "127.0.0.1", "account": "loopback"}]},
    }


@pytest.mark.parametrize("workers", [0, 2])
async def test_app_answers_and_records_every_query(tmp_path: Path, workers: int) -> None:
    zone = Zone()
    await zone.start()
    app = App(config_from_mapping(_config(tmp_path, zone.address, workers)))
    await app.start()
    try:
        [dns] = [s for s in app.services if s.name == "dns"]
        names = [f"w{i}.lw.test" for i in range(10)] + ["www.lw.test"] * 10 + ["casino.lw.test"] * 5
        for i, name in enumerate(names):
            out = DNSRecord.parse(await exchange(dns.udp_address, make_query(name, qid=i)))
            assert out.header.id == i
            assert out.header.rcode == (0 if name == "www.lw.test" else RCODE.NXDOMAIN)
        tcp = DNSRecord.parse(await exchange(dns.tcp_address, make_query("www.lw.test", qid=99), tcp=True))
        assert str(tcp.rr[0].rdata) == "192.0.2.10"
    finally:
        await app.stop()
        await zone.stop()
    recs = [r for r in query(tmp_path / "store") if isinstance(r, Dns)]
    assert len(recs) == len(names) + 1
    assert sorted(r.dns_id for r in recs) == list(range(len(names))) + [99]
    assert all(r.account == "loopback" for r in recs)
    assert sum(r.action == "block" for r in recs) == 5
    if workers == 2:
        # Both processes answered (the uid names the worker's pid): the port is shared.
        assert len({r.uid.split(".")[0] for r in recs}) == 2


def test_linewarden_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    async def serve_zone_and_run() -> tuple[int, str]:
        zone = Zone()
        await zone.start()
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cfg = _config(tmp_path, zone.address, 1, port)
        text = "\n".join([
            f'[rules]\ndir = "{cfg["rules"]["dir"]}"',
            f'[store]\ndir = "{cfg["store"]["dir"]}"\ncommit_interval_ms = 20',
            "[http]\nenabled = false",
            f'[dns]\nlisten = "127.0.0.1:{port}"\nupstreams = ["{zone.address[0]}:{zone.address[1]}"]',
        ])
        (tmp_path / "lw.toml").write_text(text + "\n")
        log = open(tmp_path / "run.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "linewarden", "run", "--config",
                                 str(tmp_path / "lw.toml")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while b"upstreams" not in (tmp_path / "run.log").read_bytes():
                assert proc.poll() is None, (tmp_path / "run.log").read_text()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            for i in range(5):
                out = DNSRecord.parse(await exchange(("127.0.0.1", port), make_query("www.lw.test", qid=i)))
                assert str(out.rr[0].rdata) == "192.0.2.10"
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None:
                await asyncio.sleep(0.1)
            return proc.returncode, (tmp_path / "run.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
            await zone.stop()

    rc, log_text = asyncio.run(serve_zone_and_run())
    assert rc == 0, log_text
    recs = [r for r in query(tmp_path / "store") if isinstance(r, Dns)]
    assert [r.dns_id for r in recs] == [0, 1, 2, 3, 4]


def test_config_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dns]\nlisten = \"nowhere\"\n")
    p = subprocess.run([sys.executable, "-m", "linewarden", "run", "--config", str(bad)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "dns.listen" in p.stderr


async def test_worker_stops_when_the_main_process_goes_away(tmp_path: Path) -> None:
    """A worker whose channel closes (the main process died) stops instead of
    answering unrecorded queries."""
    from linewarden.workers import DnsWorkers, WorkerSpec
    from storage.writer import RecordWriter

    zone = Zone()
    await zone.start()
    cfg = config_from_mapping(_config(tmp_path, zone.address, 1))
    writer = RecordWriter(tmp_path / "store")
    service = DnsWorkers(WorkerSpec(dns=cfg.dns, rules_dir=cfg.rules.dir, backend="auto", bindings=(),
                                    upstreams=(zone.address,), fail_open=True, count=1), writer)
    await service.start()
    try:
        proc = service.workers[0].process
        service.workers[0].reader.transport.close()  # type: ignore[union-attr]  # as if we died
        for _ in range(100):
            if not proc.is_alive():
                break
            await asyncio.sleep(0.1)
        assert not proc.is_alive()
    finally:
        await service.stop()
        await zone.stop()


async def test_a_dead_worker_is_replaced(tmp_path: Path) -> None:
    from linewarden.workers import DnsWorkers, WorkerSpec
    from storage.writer import RecordWriter

    zone = Zone()
    await zone.start()
    cfg = config_from_mapping(_config(tmp_path, zone.address, 1))
    writer = RecordWriter(tmp_path / "store")
    await writer.start()
    service = DnsWorkers(WorkerSpec(dns=cfg.dns, rules_dir=cfg.rules.dir, backend="auto", bindings=(),
                                    upstreams=(zone.address,), fail_open=True, count=1), writer)
    await service.start()
    try:
        await kill_first_worker_and_await_restart(service)
        out = DNSRecord.parse(await exchange(service.udp_address, make_query("www.lw.test")))
        assert str(out.rr[0].rdata) == "192.0.2.10"
    finally:
        await service.stop()
        await writer.close()
        await zone.stop()


def _nice(pid: int, tid: int | None = None) -> int:
    stat = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice


def _workers(pid: int) -> list[int]:
    """The worker processes of a ``linewarden run`` (its children but the resource tracker)."""
    kids = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (t / "children").read_text().split()]
    return [k for k in kids if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]


@pytest.mark.parametrize(("nice", "http"), [(7, False), (0, False), (7, True)], ids=["dns", "nice-0", "with-http"])
def test_the_main_process_runs_nicer_than_its_workers(tmp_path: Path, nice: int, http: bool) -> None:
    """``store.nice``: every thread of ``linewarden run`` but the one that starts workers
    runs that much nicer; the workers, a restarted one too, keep the starting priority,
    and they answer and the main process records as before. Not with HTTP workers,
    which do not stop accepting while the store is behind."""
    base = _nice(os.getpid())
    lowered = min(19, base + nice) if not http else base

    async def run() -> None:
        zone = Zone()
        await zone.start()
        port = _free_port()
        cfg = _config(tmp_path, zone.address, 1, port)
        (tmp_path / "lw.toml").write_text("\n".join([
            f'[rules]\ndir = "{cfg["rules"]["dir"]}"',
            f'[store]\ndir = "{cfg["store"]["dir"]}"\ncommit_interval_ms = 20\nnice = {nice}',
            f'[http]\nlisten = "127.0.0.1:{_free_port()}"\nworkers = 1' if http else "[http]\nenabled = false",
            f'[dns]\nlisten = "127.0.0.1:{port}"\nupstreams = ["{zone.address[0]}:{zone.address[1]}"]',
        ]) + "\n")
        log = open(tmp_path / "run.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "linewarden", "run", "--config", str(tmp_path / "lw.toml")],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            await _until(lambda: b"linewarden: store" in (tmp_path / "run.log").read_bytes(), proc, tmp_path)
            threads = {int(t.name): _nice(proc.pid, int(t.name)) for t in Path(f"/proc/{proc.pid}/task").iterdir()}
            assert sorted(threads.values()).count(base) == (1 if lowered != base else len(threads)), threads
            assert all(v in (base, lowered) for v in threads.values()), threads
            assert threads[proc.pid] == lowered
            workers = _workers(proc.pid)
            assert len(workers) == (2 if http else 1) and all(_nice(w) == base for w in workers)
            os.kill(workers[0], signal.SIGKILL)  # a worker the test's own `linewarden run` started
            await _until(lambda: len(set(_workers(proc.pid)) - set(workers)) == 1, proc, tmp_path)
            assert all(_nice(w) == base for w in _workers(proc.pid))
            for i in range(3):
                out = None
                for _ in range(50):  # the new worker binds the port once it has compiled its rules
                    try:
                        out = DNSRecord.parse(await asyncio.wait_for(
                            exchange(("127.0.0.1", port), make_query("www.lw.test", qid=i)), 1))
                        break
                    except (TimeoutError, ConnectionError):
                        await asyncio.sleep(0.1)
                assert out is not None and str(out.rr[0].rdata) == "192.0.2.10"
            proc.send_signal(signal.SIGTERM)
            await _until(lambda: proc.poll() is not None, proc, tmp_path, running=False)
        finally:
            if proc.poll() is None:
                proc.kill()
            await zone.stop()

    asyncio.run(run())
    assert [r.dns_id for r in query(tmp_path / "store") if isinstance(r, Dns)] == [0, 1, 2]


def _free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _until(cond, proc: subprocess.Popen, tmp_path: Path, running: bool = True) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while not cond():
        if running:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
        await asyncio.sleep(0.1)
