"""The fast path in explicit mode over real loopback sockets (proxy/fastpath.py, fastpath_http.py).

An origin server (HTTP and TLS) runs on 127.0.0.1 and logs every request it
receives; the proxy runs with a real Engine compiled from a small rule set and a
real RecordWriter; the client speaks raw HTTP/1.1 so that bytes can be compared.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import gzip
import itertools
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.fastpath import ConnState, FastPath, FastPathConfig, native_passthrough_available
from proxy.http_records import ConnInfo
from rules.engine import Engine
from rules.verdict import ACTIONS, Match, Verdict
from rules.wire import parse_message
from storage.config import StoreConfig
from storage.query import query
from storage.writer import RecordWriter

pytestmark = pytest.mark.e2e

KEYWORD = "澳门赌场代理"
RULES = {
    "ruleset.toml": 'name = "fastpath-test"\nversion = 7\n\n[categories.gambling]\naction = "block"\n\n'
    '[categories.doh]\naction = "block"\n\n[categories.watch]\naction = "log"\n',
    "keywords.tsv": f"id\tcategory\tkeyword\nK1\tgambling\t{KEYWORD}\nK2\twatch\twatchword\n",
    "domains.tsv": "id\tcategory\tdomain\nD1\tdoh\tdns.blocked.example\nD2\tgambling\tcasino.example\n",
}

PAGE_1K = ("<html><body>" + "欢迎访问本站。" * 60 + "</body></html>").encode()
BAD_HTML = f"<html><body><p>最新{KEYWORD}网址</p></body></html>".encode()
PNG = b"\x89PNG\r\n\x1a\n" + KEYWORD.encode() + bytes(range(256)) * 40


def _chunks(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _response(status: str, headers: list[str], body: bytes, *, chunked_parts: list[bytes] | None = None) -> bytes:
    if chunked_parts is not None:
        head = [f"HTTP/1.1 {status}", *headers, "Transfer-Encoding: chunked"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + _chunks(chunked_parts)
    head = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


GZ = gzip.compress(PAGE_1K, mtime=0)
BAD_GZ = gzip.compress(BAD_HTML, mtime=0)
ROUTES: dict[str, bytes] = {
    "/plain": _response("200 OK", ["Content-Type: text/html; charset=utf-8"], PAGE_1K),
    "/gzip": _response("200 OK", ["Content-Type: text/html; charset=utf-8", "Content-Encoding: gzip"], GZ),
    "/chunked": _response("200 OK", ["Content-Type: text/html; charset=utf-8"], b"",
                          chunked_parts=[PAGE_1K[:100], PAGE_1K[100:101], PAGE_1K[101:]]),
    "/bad": _response("200 OK", ["Content-Type: text/html; charset=utf-8"], BAD_HTML),
    "/bad-gzip-chunked": _response("200 OK", ["Content-Type: text/html; charset=utf-8", "Content-Encoding: gzip"],
                                   b"", chunked_parts=[BAD_GZ[:20], BAD_GZ[20:]]),
    "/image": _response("200 OK", ["Content-Type: image/png"], PNG),
    "/watch": _response("200 OK", ["Content-Type: text/plain"], b"a watchword here"),
}


@dataclass
class Origin:
    """HTTP/1.1 origin on loopback that logs each request it receives (method, path, body)."""

    log: list[tuple[str, str, bytes]] = field(default_factory=list)
    port: int = 0
    tls_port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                msg_head = parse_message(head) if b"content-length" not in head.lower() else None
                line = head.split(b"\r\n", 1)[0].decode()
                method, path, _ = line.split(" ")
                body = b""
                if msg_head is None:
                    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    body = await reader.readexactly(length)
                self.log.append((method, path, body))
                if method == "POST":
                    writer.write(_response("200 OK", ["Content-Type: text/plain"], b"got " + body))
                else:
                    writer.write(ROUTES.get(path, _response("404 Not Found", [], b"")))
                await writer.drain()
                if b"connection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _tls_context(tmp: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.allowed.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(n) for n in ("www.allowed.example", "dns.blocked.example")]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


@dataclass
class Lab:
    origin: Origin
    proxy: FastPath
    writer: RecordWriter
    store: Path

    @property
    def proxy_port(self) -> int:
        assert self.proxy.address is not None
        return self.proxy.address[1]

    async def records(self, kind: str) -> list:  # type: ignore[type-arg]
        async with asyncio.timeout(5):  # conn records are written when the proxy side closes
            while self.proxy.stats.active:
                await asyncio.sleep(0.01)
        await self.writer.flush()
        return list(query(self.store, kind=kind))


@pytest.fixture(params=["python", "native"])
async def lab(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    """The fast path on loopback with an origin behind it, twice: the Python path alone,
    and with the C passthrough in front (``proxy.passthrough``): every test here holds
    for both, since the same bytes must get the same answers and records."""
    native = request.param == "native"
    if native and not native_passthrough_available():
        pytest.skip("proxy._passthrough is not built (or LINEWARDEN_PURE_PYTHON=1)")
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in RULES.items():
        (rules / name).write_text(text, encoding="utf-8")
    engine = Engine.from_dir(rules)
    origin = Origin()
    http_srv = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    tls_srv = await asyncio.start_server(origin.handle, "127.0.0.1", 0, ssl=_tls_context(tmp_path))
    origin.port = http_srv.sockets[0].getsockname()[1]
    origin.tls_port = tls_srv.sockets[0].getsockname()[1]
    store = tmp_path / "store"
    writer = RecordWriter(store, StoreConfig(commit_interval_ms=20))
    await writer.start()
    proxy = FastPath(engine, writer.submit, FastPathConfig(listen=("127.0.0.1", 0), response_hold_max=64 * 1024,
                                                           request_hold_max=64 * 1024), native=native)
    await proxy.start()
    assert (proxy.native is not None) == native
    try:
        yield Lab(origin, proxy, writer, store)
    finally:
        await proxy.stop()
        await writer.close()
        for srv in (http_srv, tls_srv):
            srv.close()


async def exchange(lab: Lab, raw: bytes, *, timeout: float = 10) -> bytes:
    """Send raw bytes to the proxy, read until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
    writer.write(raw)
    await writer.drain()
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


def get(lab: Lab, path: str, extra: str = "") -> bytes:
    return (f"GET http://127.0.0.1:{lab.origin.port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{lab.origin.port}\r\n"
            f"User-Agent: lw-test\r\n{extra}Connection: close\r\n\r\n").encode()


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def entity(raw: bytes) -> bytes:
    return parse_message(raw).body


# -- plain HTTP, allowed: byte-identical ----------------------------------------------------


@pytest.mark.parametrize("path", ["/plain", "/gzip", "/chunked", "/image"])
async def test_allowed_pages_arrive_byte_identical(lab: Lab, path: str) -> None:
    raw = await exchange(lab, get(lab, path))
    sent = ROUTES[path]
    assert parse_message(raw).status == 200
    assert entity(raw) == entity(sent)  # gzip bytes and de-chunked bodies identical
    if path != "/chunked":
        assert raw == sent  # same head (names, order, values) and same body bytes
    else:
        assert split_response(raw)[0] == split_response(sent)[0]


async def test_keep_alive_and_pipelining_keep_order(lab: Lab) -> None:
    p = lab.origin.port
    two = (f"GET http://127.0.0.1:{p}/plain HTTP/1.1\r\nHost: x\r\n\r\n"
           f"GET http://127.0.0.1:{p}/gzip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
    raw = await exchange(lab, two)
    assert raw == ROUTES["/plain"] + ROUTES["/gzip"]
    conns = await lab.records("conn")
    assert len(conns) == 1 and conns[0].service == "http"
    assert [h.url for h in await lab.records("http")] == [f"http://127.0.0.1:{p}/plain", f"http://127.0.0.1:{p}/gzip"]


# -- blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/bad", "/bad-gzip-chunked"])
async def test_blocked_response_is_replaced_by_451(lab: Lab, path: str) -> None:
    raw = await exchange(lab, get(lab, path))
    msg = parse_message(raw)
    assert msg.status == 451
    page = msg.body.decode()
    assert "gambling" in page
    assert KEYWORD not in page  # never echoes the matched text
    [h] = await lab.records("http")
    assert h.action == "block" and h.rule_ids == ["K1"] and h.category == "gambling"
    assert h.status == 200 and KEYWORD in (h.snippet or "")
    assert h.uid in page  # the reference id is the record's uid


async def test_blocked_post_never_reaches_the_origin(lab: Lab) -> None:
    body = f"subject=hi&content=最新{KEYWORD}网址".encode()
    p = lab.origin.port
    req = (f"POST http://127.0.0.1:{p}/forum/post HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n"
           f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
           f"Connection: close\r\n\r\n").encode() + body
    raw = await exchange(lab, req)
    assert parse_message(raw).status == 451
    assert all(m != "POST" for m, _, _ in lab.origin.log)  # the origin's own log
    [h] = await lab.records("http")
    assert (h.method, h.action, h.rule_ids, h.status) == ("POST", "block", ["K1"], None)
    assert h.req_bytes == len(body) and h.evidence
    [c] = await lab.records("conn")
    assert c.action == "block" and c.bytes_down == 0 and c.nat_port is None


async def test_allowed_post_reaches_the_origin_after_100_continue(lab: Lab) -> None:
    body = b"content=hello"
    p = lab.origin.port
    head = (f"POST http://127.0.0.1:{p}/forum/post HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
    writer.write(head)
    async with asyncio.timeout(10):
        # The proxy reads the body itself (to scan it before the server sees it).
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        raw = await reader.read(-1)
    writer.close()
    assert entity(raw) == b"got content=hello"
    assert lab.origin.log == [("POST", "/forum/post", body)]


async def test_domain_rule_blocks_before_connecting(lab: Lab) -> None:
    req = b"GET http://www.casino.example/ HTTP/1.1\r\nHost: www.casino.example\r\nConnection: close\r\n\r\n"
    raw = await exchange(lab, req)
    assert parse_message(raw).status == 451
    [h] = await lab.records("http")
    assert h.rule_ids == ["D2"] and h.host == "www.casino.example"
    assert lab.origin.log == []


async def test_log_rule_passes_and_is_recorded(lab: Lab) -> None:
    raw = await exchange(lab, get(lab, "/watch"))
    assert raw == ROUTES["/watch"]
    [h] = await lab.records("http")
    assert h.action == "log" and h.rule_ids == ["K2"]


async def test_response_past_the_scan_window_is_cut_on_a_late_match(lab: Lab) -> None:
    big = b"<html>" + b"x" * (100 * 1024) + KEYWORD.encode() + b"</html>"
    ROUTES["/big-late"] = _response("200 OK", ["Content-Type: text/html; charset=utf-8"], big)
    try:
        raw = await exchange(lab, get(lab, "/big-late"))
    except ConnectionResetError:
        raw = b""
    assert len(raw) < len(big)  # the client never gets the whole body
    [h] = await lab.records("http")
    assert h.action == "block" and h.rule_ids == ["K1"]
    [c] = await lab.records("conn")
    assert c.close_reason == "blocked"


# -- malformed -----------------------------------------------------------------------------


async def test_bad_chunk_size_gets_400_and_a_record(lab: Lab) -> None:
    p = lab.origin.port
    req = (f"POST http://127.0.0.1:{p}/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           "zz\r\nhello\r\n0\r\n\r\n").encode()
    raw = await exchange(lab, req)
    assert parse_message(raw).status == 400
    assert lab.origin.log == []
    [h] = await lab.records("http")
    assert h.action == "block" and h.status == 400
    # the proxy keeps serving others
    assert await exchange(lab, get(lab, "/plain")) == ROUTES["/plain"]


async def test_smuggling_cl_te_is_refused(lab: Lab) -> None:
    p = lab.origin.port
    req = (f"POST http://127.0.0.1:{p}/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
           "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode()
    raw = await exchange(lab, req)
    assert parse_message(raw).status == 400
    assert lab.origin.log == []


async def test_unreachable_server_gets_502(lab: Lab) -> None:
    req = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: close\r\n\r\n"
    raw = await exchange(lab, req)
    assert parse_message(raw).status == 502


# -- TLS through CONNECT -------------------------------------------------------------------


async def _tls_get(lab: Lab, sni: str, path: str = "/plain") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
    try:
        writer.write(f"CONNECT 127.0.0.1:{lab.origin.tls_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        await writer.start_tls(ctx, server_hostname=sni)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


async def test_tls_passthrough_is_spliced_and_counted(lab: Lab) -> None:
    raw = await _tls_get(lab, "www.allowed.example")
    assert raw == ROUTES["/plain"]
    [t] = await lab.records("tls")
    assert (t.sni, t.action, t.intercepted, t.tls_version) == ("www.allowed.example", "allow", False, "TLSv1.3")
    assert t.server_ip == "127.0.0.1" and t.server_port == lab.origin.tls_port and t.nat_port
    conns = await lab.records("conn")
    [c] = [c for c in conns if c.uid == t.uid]
    assert c.service == "tls" and c.bytes_down > len(ROUTES["/plain"]) and c.bytes_up > 200
    assert c.close_reason == "fin" and (c.nat_ip, c.nat_port) == (t.nat_ip, t.nat_port)
    assert c.community_id and c.community_id.startswith("1:")
    assert lab.origin.log == [("GET", "/plain", b"")]


async def test_a_passed_through_connection_is_freed_without_the_cyclic_gc(lab: Lab) -> None:
    """Its objects go by reference counting once it is recorded: none is left for a
    cyclic collection to find (``FastPath._closed`` cuts the relay's two-way join)."""
    import proxy.fastpath as fastpath
    import proxy.relay as relay

    ours = (fastpath.ConnState, fastpath.TlsDecision, relay.Side, relay._Joined)
    gc.collect()
    flags = gc.get_debug()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)  # unreachable objects are kept in gc.garbage, not freed
        assert await _tls_get(lab, "www.allowed.example") == ROUTES["/plain"]
        await lab.records("conn")
        await asyncio.sleep(0.05)  # the transports' last callbacks
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, ours)]
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
        gc.enable()
    assert left == []


async def test_sni_block_ends_the_handshake(lab: Lab) -> None:
    with pytest.raises(ssl.SSLError, match="ACCESS_DENIED|access denied"):
        await _tls_get(lab, "dns.blocked.example")
    [t] = await lab.records("tls")
    assert (t.sni, t.action, t.rule_ids) == ("dns.blocked.example", "block", ["D1"])
    [c] = await lab.records("conn")
    assert c.close_reason == "blocked" and c.bytes_down == 0
    assert lab.origin.log == []


def _client_hello(sni: str) -> bytes:
    """A real ClientHello (the ``ssl`` module's), as a client's first bytes in a tunnel."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def _tunnel(lab: Lab, port: int, pieces: list[bytes]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT to ``port`` whose head is sent in ``pieces`` (joined: the whole head)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_connect_head_and_hello_in_pieces_are_passed_through(lab: Lab) -> None:
    # The head split over two reads goes the HTTP path's way, the hello over two
    # segments is reassembled: the same decision and records either way.
    head = f"CONNECT 127.0.0.1:{lab.origin.tls_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for pieces in ([head], [head[:10], head[10:]]):
        reader, writer = await _tunnel(lab, lab.origin.tls_port, pieces)
        hello = _client_hello("www.allowed.example")
        writer.write(hello[:40])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(hello[40:])
        async with asyncio.timeout(10):
            server_hello = await reader.read(5)
        assert server_hello[:2] == b"\x16\x03"  # the origin's ServerHello came back through
        writer.close()
    tls = await lab.records("tls")
    assert [(t.sni, t.action, t.tls_version) for t in tls] == [("www.allowed.example", "allow", "TLSv1.3")] * 2
    conns = await lab.records("conn")
    assert sorted(c.uid for c in conns) == sorted(t.uid for t in tls)
    assert all(c.service == "tls" and c.bytes_up == len(head) + len(hello) and c.nat_port for c in conns)


async def test_unreachable_tls_server_is_recorded_with_the_connect_error(lab: Lab) -> None:
    reader, writer = await _tunnel(lab, 1, [b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n"])
    writer.write(_client_hello("www.allowed.example"))
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    writer.close()
    [t] = await lab.records("tls")
    [c] = await lab.records("conn")
    assert t.uid == c.uid and t.sni == "www.allowed.example" and t.server_port == 1 and t.nat_port is None
    assert c.service == "tls" and c.close_reason.startswith("error: connect 127.0.0.1:1:")


async def test_stopping_the_proxy_ends_tls_tunnels_and_records_them(lab: Lab) -> None:
    reader, writer = await _tunnel(lab, lab.origin.tls_port,
                                   [f"CONNECT 127.0.0.1:{lab.origin.tls_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()])
    writer.write(_client_hello("www.allowed.example"))
    async with asyncio.timeout(10):
        assert (await reader.read(5))[:2] == b"\x16\x03"
        await lab.proxy.stop()
        await reader.read()  # to EOF: the proxy closed its side
    writer.close()
    [t] = await lab.records("tls")
    [c] = await lab.records("conn")
    assert t.uid == c.uid and c.close_reason == "shutdown" and c.bytes_down > 0 and lab.proxy.stats.active == 0


async def test_silent_client_is_closed_after_the_first_bytes_timeout(lab: Lab,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import fastpath

    monkeypatch.setattr(fastpath, "FIRST_BYTES_TIMEOUT", 0.2)
    monkeypatch.setattr(fastpath, "WAIT_SWEEP_S", 0.05)
    if lab.proxy.native is not None:
        lab.proxy.native._c.first_timeout = 0.2  # C's sweep runs each second: still well within 5 s
    reader, writer = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
    talking_r, talking_w = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
    talking_w.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n")  # and then nothing
    async with asyncio.timeout(5):
        assert (await talking_r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert await reader.read() == b""  # closed by the sweep, not by the client
    await asyncio.sleep(0.3)
    assert not talking_r.at_eof()  # no first-bytes limit once it has spoken
    for w in (writer, talking_w):
        w.close()
    conns = await lab.records("conn")
    assert sorted(c.close_reason for c in conns) == ["fin", "timeout"]
    assert not lab.proxy._waits and lab.proxy._sweeper is None  # nothing left to watch


def _unanswered_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: a connect to it waits (its SYNs dropped)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(srv.getsockname())
        fillers.append(f)
    return srv, fillers


@pytest.mark.parametrize("end", ["timeout", "stop"])
async def test_a_connect_that_hangs_ends_by_its_timeout_or_the_stop(lab: Lab, end: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from proxy import fastpath

    monkeypatch.setattr(fastpath, "WAIT_SWEEP_S", 0.05)
    lab.proxy.config = dataclasses.replace(lab.proxy.config, connect_timeout=0.3 if end == "timeout" else 30)
    srv, fillers = _unanswered_listener()
    port = srv.getsockname()[1]
    try:
        reader, writer = await _tunnel(lab, port, [f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()])
        writer.write(_client_hello("www.allowed.example"))
        async with asyncio.timeout(10):
            if end == "stop":
                await asyncio.sleep(0.3)
                await lab.proxy.stop()
            assert await reader.read() == b""
        writer.close()
        tls = await lab.records("tls")
        [c] = await lab.records("conn")
    finally:
        for s in (srv, *fillers):
            s.close()
    if end == "timeout":
        [t] = tls
        assert t.uid == c.uid and t.sni == "www.allowed.example" and t.nat_port is None
        assert c.close_reason == f"error: connect 127.0.0.1:{port}: "
    else:  # as on the task path: a connect the stop cut short leaves the conn record alone
        assert tls == [] and c.close_reason == "shutdown" and c.service == "tls"


async def test_records_join_on_uid_and_carry_nat(lab: Lab) -> None:
    await exchange(lab, get(lab, "/plain"))
    [h] = await lab.records("http")
    [c] = await lab.records("conn")
    assert h.uid == c.uid
    assert (c.client_ip, c.server_ip, c.server_port) == ("127.0.0.1", "127.0.0.1", lab.origin.port)
    assert c.nat_ip == "127.0.0.1" and c.nat_port and c.nat_port != c.client_port
    assert c.bytes_down == len(ROUTES["/plain"]) and c.ruleset_version == 7
    assert h.user_agent == "lw-test" and h.resp_bytes == len(PAGE_1K) and h.content_type


async def test_request_past_the_hold_cap_is_cut_on_a_late_match(lab: Lab) -> None:
    # 64 KiB hold cap in this lab: the body is streamed past it, one piece behind,
    # so the piece with the match (the last) never reaches the origin.
    body = b"content=" + b"a" * (100 * 1024) + f"最新{KEYWORD}".encode()
    p = lab.origin.port
    head = (f"POST http://127.0.0.1:{p}/upload HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
    writer.write(head)
    for i in range(0, len(body), 16 * 1024):
        writer.write(body[i : i + 16 * 1024])
        await writer.drain()
        await asyncio.sleep(0.01)
    async with asyncio.timeout(10):
        raw = await reader.read(-1)
    writer.close()
    assert parse_message(raw).status == 451
    [h] = await lab.records("http")
    assert h.action == "block" and h.rule_ids == ["K1"] and h.req_bytes == len(body)
    await asyncio.sleep(0.2)
    assert all(m != "POST" for m, _, _ in lab.origin.log)  # the origin never got a whole request


async def test_pipelined_requests_after_a_block_still_get_answers(lab: Lab) -> None:
    p = lab.origin.port
    two = (f"GET http://www.casino.example/ HTTP/1.1\r\nHost: www.casino.example\r\n\r\n"
           f"GET http://127.0.0.1:{p}/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
    raw = await exchange(lab, two)
    first_len = int(raw.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
    first_end = raw.index(b"\r\n\r\n") + 4 + first_len
    assert parse_message(raw[:first_end]).status == 451
    assert raw[first_end:] == ROUTES["/plain"]


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_gzip_bomb_follows_the_fail_policy(tmp_path: Path, fail: str) -> None:
    # 64 MiB of zeros in ~64 KiB of gzip: past the Engine's decode cap (16 MiB).
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9, mtime=0)
    resp = _response("200 OK", ["Content-Type: text/html", "Content-Encoding: gzip"], bomb)
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in RULES.items():
        (rules / name).write_text(text, encoding="utf-8")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(resp)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    seen: list = []  # type: ignore[type-arg]
    proxy = FastPath(Engine.from_dir(rules), lambda r: seen.append(r) or True,
                     FastPathConfig(listen=("127.0.0.1", 0), fail=fail))  # type: ignore[arg-type]
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.address[1])  # type: ignore[index]
        writer.write(f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(60):
            raw = await reader.read(-1)
        writer.close()
    finally:
        await proxy.stop()
        srv.close()
    [h] = [r for r in seen if type(r).__name__ == "Http"]
    if fail == "closed":
        assert parse_message(raw).status == 451 and h.action == "block" and "fail-closed" in (h.evidence or "")
    else:
        assert raw == resp and h.action == "allow"  # passed through untouched, and recorded


async def test_raw_tunnel_is_relayed_byte_identical_and_counted_exactly(lab: Lab) -> None:
    # Neither TLS nor HTTP inside the CONNECT: relayed as is. The origin reads until
    # the client's FIN (a half-close through the proxy), then answers and closes.
    up, down = bytes(range(7, 256)) * 4000 + b"\x00", bytes(range(256)) * 8000
    got_up: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got_up.append(await reader.read())
        writer.write(down)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    head = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
        writer.write(head)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(up)
        writer.write_eof()
        async with asyncio.timeout(20):
            got_down = await reader.read()
        writer.close()
    finally:
        srv.close()
    assert got_up == [up] and got_down == down
    [c] = await lab.records("conn")
    assert (c.service, c.close_reason, c.server_port) == (None, "fin", port)
    assert (c.bytes_up, c.bytes_down) == (len(head) + len(up), len(down))
    assert c.nat_ip == "127.0.0.1" and c.nat_port


async def test_stopping_the_proxy_ends_open_tunnels_and_frees_their_descriptors(lab: Lab) -> None:
    import os

    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.put_nowait(await reader.readexactly(5))
        await reader.read()  # holds the tunnel open until the proxy closes it
        writer.close()
        got.put_nowait(b"closed")

    def sockets_and_pipes() -> int:
        # The store opens its files meanwhile: count only what a relay could leave behind.
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return sum(1 for link in links if link.startswith(("socket:", "pipe:")))

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    fds_before = sockets_and_pipes()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", lab.proxy_port)
        writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(b"hello")
        async with asyncio.timeout(10):
            assert await got.get() == b"hello"
            await lab.proxy.stop()
            assert await reader.read() == b""
            assert await got.get() == b"closed"
        writer.close()
        await asyncio.sleep(0.1)
        # The client's socket and the origin's side are gone too; nothing of the relay stays.
        assert sockets_and_pipes() == fds_before - 1  # the proxy's listening socket
    finally:
        srv.close()
    [c] = await lab.records("conn")
    assert c.close_reason == "shutdown" and c.bytes_up > 5


@pytest.mark.parametrize(("head", "target"), [
    (b"CONNECT www.example.org:443 HTTP/1.1\r\nHost: www.example.org:443\r\n\r\n", ("www.example.org", 443, False)),
    (b"CONNECT 10.0.0.1:8443 HTTP/1.1\r\nHost: x\r\nProxy-Connection: Keep-Alive\r\n\r\n", ("10.0.0.1", 8443, True)),
    (b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n", ("2001:db8::1", 443, True)),
    (b"CONNECT www.example.org HTTP/1.1\r\nHost: x\r\n\r\n", ("www.example.org", 443, False)),
    (b"CONNECT bad host:443 HTTP/1.1\r\nHost: x\r\n\r\n", None),  # llhttp refuses: the HTTP path answers 400
    (b"CONNECT www.example.org:99999 HTTP/1.1\r\nHost: x\r\n\r\n", None),  # _split_authority refuses
    (b"CONNECT a:443 HTTP/1.1\r\nHost: x\r\n\nX: y\r\n\r\n", None),  # the head ends earlier (bare LF)
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", None),
])
def test_connect_target_is_what_the_http_path_reads_and_is_remembered(
        head: bytes, target: tuple[str, int, bool] | None) -> None:
    from proxy import fastpath

    fastpath._connect_memo.clear()
    assert fastpath._connect_target(head) == target
    assert fastpath._connect_target(head) == target  # from the memo when it was one
    assert (head in fastpath._connect_memo) == (target is not None)
    fastpath._connect_memo.clear()


def test_sni_verdicts_are_remembered_per_engine() -> None:
    from proxy.fastpath import SNI_MEMO_MAX
    from rules.verdict import Verdict

    class CountingEngine:
        version = 1

        def __init__(self, action: str) -> None:
            self.action, self.calls = action, 0

        def tls(self, sni: str | None) -> Verdict:
            self.calls += 1
            return Verdict(self.action, ruleset_version=self.version)  # type: ignore[arg-type]

    class Ref:
        engine: object = None

    ref = Ref()
    ref.engine = old = CountingEngine("allow")
    proxy = FastPath(ref, lambda r: True)
    assert [proxy._sni_verdict(ref.engine, "a.example").action for _ in range(3)] == ["allow"] * 3
    assert old.calls == 1
    ref.engine = new = CountingEngine("block")  # a reload: the new Engine decides, once
    assert [proxy._sni_verdict(ref.engine, "a.example").action for _ in range(2)] == ["block"] * 2
    assert new.calls == 1
    for i in range(SNI_MEMO_MAX + 1):
        proxy._sni_verdict(new, f"{i}.example")
    assert len(proxy._sni_memo) <= SNI_MEMO_MAX


def _note_reference(state: ConnState, verdict: Verdict) -> None:
    """``ConnState.note`` as it was before its no-match shortcut: every verdict folded in full."""
    if ACTIONS.index(verdict.action) > ACTIONS.index(state.action):
        state.action = verdict.action
    for rid in verdict.rule_ids:
        if rid not in state.rule_ids:
            state.rule_ids.append(rid)
    state.ruleset_version = verdict.ruleset_version or state.ruleset_version


def _match(rule_id: str, action: str) -> Match:
    return Match(rule_id, "cat", "domain", "x.example", action, "sni")  # type: ignore[arg-type]


_VERDICTS = [
    Verdict("allow", (), 3),
    Verdict("allow", (), 0),
    Verdict("block", (), 4, errors=("tls: unparsable ClientHello",)),  # fail closed: no match
    Verdict("log", (_match("L1", "log"),), 5),
    Verdict("block", (_match("B1", "block"), _match("L1", "log")), 5),
    Verdict("log", (_match("L2", "log"),), None),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("order", [list(p) for p in itertools.permutations(range(len(_VERDICTS)), 3)])
def test_a_connection_folds_its_decisions_as_every_one_folded_in_full(order: list[int]) -> None:
    fast = ConnState(ConnInfo("C1", 0, "10.0.0.1", 1))
    full = ConnState(ConnInfo("C1", 0, "10.0.0.1", 1))
    for i in order:
        fast.note(_VERDICTS[i])
        _note_reference(full, _VERDICTS[i])
        assert (fast.action, fast.rule_ids, fast.ruleset_version) == (full.action, full.rule_ids, full.ruleset_version)
