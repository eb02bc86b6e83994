"""proxy/http_service.py: the service as `linewarden run` builds it, on loopback.

Interception through the embedded mitmproxy (the fast path hands the TLS
connection over with a loopback CONNECT), and worker processes feeding the one
writer. Origin, rules and client helpers come from test_fastpath.
"""

from __future__ import annotations

import asyncio
from ipaddress import ip_network
import ssl
from pathlib import Path

import pytest

from proxy.fastpath import FastPathConfig
from linewarden.workers import HttpWorkers, HttpWorkerSpec
from proxy.http_service import HttpProxyService, HttpServiceConfig
from proxy.identity import Binding
from proxy.tls_ca import init_ca
from rules.engine import Engine
from rules.wire import parse_message
from storage.config import StoreConfig
from storage.query import query
from storage.writer import RecordWriter
from tests.conftest import kill_first_worker_and_await_restart
from tests.proxy.test_fastpath import KEYWORD, ROUTES, RULES, Origin, _tls_context

pytestmark = pytest.mark.e2e


@pytest.fixture
async def origin(tmp_path: Path):  # type: ignore[no-untyped-def]
    o = Origin()
    a = await asyncio.start_server(o.handle, "127.0.0.1", 0)
    b = await asyncio.start_server(o.handle, "127.0.0.1", 0, ssl=_tls_context(tmp_path))
    o.port, o.tls_port = a.sockets[0].getsockname()[1], b.sockets[0].getsockname()[1]
    yield o
    a.close()
    b.close()


def _rules(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    for name, text in RULES.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


async def _tls(proxy_port: int, origin: Origin, sni: str, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        writer.write(f"CONNECT 127.0.0.1:{origin.tls_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the client would trust the unit's CA; not under test here
        await writer.start_tls(ctx, server_hostname=sni)
        writer.write(request)
        async with asyncio.timeout(15):
            return await reader.read(-1)
    finally:
        writer.close()


async def test_intercepted_https_gets_the_full_http_treatment(tmp_path: Path, origin: Origin) -> None:
    ca = init_ca(tmp_path / "ca")
    writer = RecordWriter(tmp_path / "store", StoreConfig(commit_interval_ms=20))
    await writer.start()
    cfg = HttpServiceConfig(FastPathConfig(listen=("127.0.0.1", 0), intercept=("allowed.example",)),
                            ca_dir=str(ca.directory), upstream_verify=False)
    svc = HttpProxyService(Engine.from_dir(_rules(tmp_path)), writer.submit, cfg)
    await svc.start()
    try:
        assert svc.address is not None and svc.mitm_address is not None
        port = svc.address[1]
        ok = await _tls(port, origin, "www.allowed.example",
                        b"GET /plain HTTP/1.1\r\nHost: www.allowed.example\r\nConnection: close\r\n\r\n")
        assert parse_message(ok).body == parse_message(ROUTES["/plain"]).body
        bad = await _tls(port, origin, "www.allowed.example",
                         b"GET /bad HTTP/1.1\r\nHost: www.allowed.example\r\nConnection: close\r\n\r\n")
        page = parse_message(bad)
        assert page.status == 451 and KEYWORD not in page.body.decode()
        body = f"content={KEYWORD}".encode()
        post = await _tls(port, origin, "www.allowed.example",
                          b"POST /forum HTTP/1.1\r\nHost: www.allowed.example\r\nContent-Type: "
                          b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                          % len(body) + body)
        assert parse_message(post).status == 451
        assert [m for m, _, _ in origin.log] == ["GET", "GET"]  # the POST never reached the origin
        async with asyncio.timeout(5):
            while svc.fastpath and svc.fastpath.stats.active:
                await asyncio.sleep(0.01)
    finally:
        await svc.stop()
        await writer.close()
    recs = list(query(tmp_path / "store"))
    tls = [r for r in recs if type(r).__name__ == "Tls"]
    https = [r for r in recs if type(r).__name__ == "Http"]
    conns = {r.uid: r for r in recs if type(r).__name__ == "Conn"}
    assert len(tls) == 3 and all(t.intercepted and t.sni == "www.allowed.example" for t in tls)
    assert sorted((h.method, h.url, h.action) for h in https) == [
        ("GET", "/bad", "block"), ("GET", "/plain", "allow"), ("POST", "/forum", "block")]
    for h in https:
        c = conns[h.uid]  # the addon's http record joins the fast path's conn record
        assert h.client_ip == "127.0.0.1" and h.client_port == c.client_port
        assert h.server_port == origin.tls_port and h.nat_port and (c.nat_ip, c.nat_port) == (h.nat_ip, h.nat_port)


async def test_worker_processes_share_the_port_and_feed_one_writer(tmp_path: Path, origin: Origin) -> None:
    writer = RecordWriter(tmp_path / "store", StoreConfig(commit_interval_ms=20))
    await writer.start()
    cfg = HttpServiceConfig(FastPathConfig(listen=("127.0.0.1", 0)))
    spec = HttpWorkerSpec(config=cfg, rules_dir=str(_rules(tmp_path)), backend="auto",
                          bindings=(Binding(ip_network("127.0.0.1/32"), "lab"),), fail_open=True, count=2)
    svc = HttpWorkers(spec, writer)
    await svc.start()
    try:
        assert svc.address is not None and len(svc.workers) == 2
        p = origin.port

        async def one(path: str) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", svc.address[1])  # type: ignore[index]
            w.write(f"GET http://127.0.0.1:{p}{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            async with asyncio.timeout(10):
                out = await r.read(-1)
            w.close()
            return out

        got = await asyncio.gather(*(one("/plain" if i % 2 else "/bad") for i in range(20)))
    finally:
        await svc.stop()  # SIGTERM: the workers flush their records before they exit
        await writer.close()
    assert sum(1 for g in got if g == ROUTES["/plain"]) == 10
    assert sum(1 for g in got if parse_message(g).status == 451) == 10
    https = [r for r in query(tmp_path / "store", kind="http")]
    assert len(https) == 20 and all(h.account == "lab" for h in https)
    assert sorted(h.action for h in https) == ["allow"] * 10 + ["block"] * 10
    assert len(list(query(tmp_path / "store", kind="conn"))) == 20


async def test_a_dead_http_worker_is_replaced(tmp_path: Path, origin: Origin) -> None:
    writer = RecordWriter(tmp_path / "store", StoreConfig(commit_interval_ms=20))
    await writer.start()
    cfg = HttpServiceConfig(FastPathConfig(listen=("127.0.0.1", 0)))
    svc = HttpWorkers(HttpWorkerSpec(config=cfg, rules_dir=str(_rules(tmp_path)), backend="auto", bindings=(),
                                     fail_open=True, count=1), writer)
    await svc.start()
    try:
        port = svc.address
        await kill_first_worker_and_await_restart(svc)
        assert svc.address == port  # the replacement listens where the first one did
        r, w = await asyncio.open_connection("127.0.0.1", svc.address[1])
        w.write(f"GET http://127.0.0.1:{origin.port}/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            out = await r.read(-1)
        w.close()
        assert out == ROUTES["/plain"]
    finally:
        await svc.stop()
        await writer.close()
