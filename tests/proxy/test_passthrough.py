"""The C passthrough (proxy/_passthrough.c, proxy/passthrough.py) over real loopback sockets.

The Python path decides a CONNECT head and a server name once; from then on the C
thread carries the same bytes itself. Every test here makes the first connection
through the Python path and the next ones through C, proves which path carried
each (the events C reported, by the client's port), and holds the records of the
two to each other field by field: C must be invisible in the store.

The TLS origin signs with RSA (fixed-length signatures), and the client counts the
bytes that reach it on the wire (``WireTls``), so that equal traffic is equal bytes
and a conn record's ``bytes_down`` can be checked exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import sqlite3
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from proxy.dns_shim import EngineRef
from proxy.fastpath import FastPath, FastPathConfig, native_passthrough_available
from rules.engine import Engine
from storage.config import StoreConfig
from storage.query import query
from storage.records import Record
from storage.writer import RecordWriter
from tests.proxy.test_fastpath import PAGE_1K, RULES, _client_hello, _response, _unanswered_listener

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not native_passthrough_available(),
                       reason="proxy._passthrough is not built (or LINEWARDEN_PURE_PYTHON=1)"),
]

ALLOWED = "www.allowed.example"
BLOCKED = "dns.blocked.example"  # D1 in test_fastpath's RULES (category doh: block)
BULK = bytes(range(256)) * (32 * 1024)
"""8 MiB: past SPLICE_AFTER (256 KiB) many times over, and past what the socket buffers
between C and a client that reads late can hold (tcp_wmem's 4 MiB at most), so C's writes
to it must wait for room (EPOLLOUT) at some point."""
ROUTES = {
    "/page": _response("200 OK", ["Content-Type: text/html; charset=utf-8"], PAGE_1K),
    "/bulk": _response("200 OK", ["Content-Type: application/octet-stream"], BULK),
}
HOLD_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
"""The origin's answer to ``/hold``: a body announced and never sent."""
VARYING = frozenset({"uid", "ts", "ts_end", "client_port", "nat_port", "community_id"})
"""What differs between two connections of equal traffic: everything else must be equal."""
RECORD_WAIT_S = 5.0


# -- the lab ------------------------------------------------------------------------


@dataclass
class Origin:
    """HTTP and TLS on loopback; logs (peer port, path) of every request it answers."""

    seen: list[tuple[int, str]] = field(default_factory=list)
    port: int = 0
    tls_port: int = 0
    tls6_port: int = 0
    """TLS on ::1."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_port = writer.get_extra_info("peername")[1]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.seen.append((peer_port, path))
            if path == "/hold":  # a head, and then nothing until the client closes
                writer.write(HOLD_HEAD)
                await reader.read()
                return
            writer.write(ROUTES.get(path, _response("404 Not Found", [], b"")))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()  # one request a connection (Connection: close)


@dataclass
class NativeLab:
    origin: Origin
    proxy: FastPath
    writer: RecordWriter
    store: Path
    events: list[tuple[str, int]]
    """(event name, client port) of every event C reported, in order."""

    @property
    def port(self) -> int:
        assert self.proxy.address is not None
        return self.proxy.address[1]

    def path_of(self, client_port: int) -> list[str]:
        """The events C reported about one client connection."""
        return [name for name, port in self.events if port == client_port]

    async def records(self, kind: str, count: int) -> list[Any]:
        """The ``kind`` records once ``count`` are stored (C's events come in batches: the
        fast path's ``stats.active`` does not count a C connection until its first one)."""
        deadline = time.monotonic() + RECORD_WAIT_S
        while True:
            await self.writer.flush()
            try:
                found = list(query(self.store, kind=kind))
            except sqlite3.OperationalError:  # the writer is still creating the day's file
                found = []
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.02)


def _rules(tmp: Path, name: str, files: dict[str, str]) -> Path:
    rules = tmp / name
    rules.mkdir()
    for file, text in files.items():
        (rules / file).write_text(text, encoding="utf-8")
    return rules


def _spy(proxy: FastPath, log: list[tuple[str, int]]) -> None:
    """Log every event C reports, then handle it as before (an instance attribute
    shadows ``NativePassthrough._event``, which ``_events`` calls for each one)."""
    from proxy import _passthrough as native
    from proxy.passthrough import E_PEER, E_TYPE

    names = {getattr(native, n): n.lower() for n in ("HANDOFF", "CONNECTED", "BLOCKED", "FAILED", "FINISHED", "EARLY")}
    handle = proxy.native._event

    def spy(ev: tuple[Any, ...]) -> None:
        log.append((names[ev[E_TYPE]], ev[E_PEER][1]))
        handle(ev)

    proxy.native._event = spy


@contextlib.asynccontextmanager
async def running(tmp: Path, server_ctx: ssl.SSLContext, *, native: bool = True, engine: object | None = None,
                  **config: Any) -> AsyncIterator[NativeLab]:
    """Origin, store and fast path on loopback (``native``: the C passthrough in front)."""
    if engine is None:
        engine = Engine.from_dir(_rules(tmp, "rules", RULES))
    origin = Origin()
    http_srv = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    tls_srv = await asyncio.start_server(origin.handle, "127.0.0.1", 0, ssl=server_ctx)
    tls6_srv = await asyncio.start_server(origin.handle, "::1", 0, ssl=server_ctx)
    origin.port = http_srv.sockets[0].getsockname()[1]
    origin.tls_port = tls_srv.sockets[0].getsockname()[1]
    origin.tls6_port = tls6_srv.sockets[0].getsockname()[1]
    store = tmp / "store"
    writer = RecordWriter(store, StoreConfig(commit_interval_ms=20))
    await writer.start()
    proxy = FastPath(engine, writer.submit, FastPathConfig(listen=("127.0.0.1", 0), **config), native=native)
    await proxy.start()
    assert (proxy.native is not None) == native
    events: list[tuple[str, int]] = []
    if native:
        _spy(proxy, events)
    try:
        yield NativeLab(origin, proxy, writer, store, events)
    finally:
        await proxy.stop()
        await writer.close()
        for srv in (http_srv, tls_srv, tls6_srv):
            srv.close()


@pytest.fixture(scope="module")
def server_ctx(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """The TLS origin's context: RSA, so every handshake is the same number of bytes
    (an ECDSA signature's DER length varies from one handshake to the next)."""
    tmp = tmp_path_factory.mktemp("tls")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ALLOWED)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ALLOWED), x509.DNSName(BLOCKED)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    ctx.lw_files = (tmp / "cert.pem", tmp / "key.pem")  # type: ignore[attr-defined]  # for a child process
    return ctx


# -- the client -----------------------------------------------------------------------


class WireTls:
    """A TLS client over a plain stream (``ssl.MemoryBIO``) that counts what reaches it
    on the wire: asyncio's own TLS hides the record bytes, and a conn record counts them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sni: str | None) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_hostname=sni)
        self._reader, self._writer = reader, writer
        self.wire_in = 0

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _receive(self) -> bool:
        data = await self._reader.read(1 << 16)
        self.wire_in += len(data)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        return bool(data)

    async def handshake(self, *, finish: bool = True) -> None:
        """Raises ``ssl.SSLError`` when the proxy answers with an alert. ``finish`` False:
        the server's whole flight is in, the client's Finished is not sent."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive()
                continue
            if finish:
                await self._flush()
            return

    async def read_until(self, marker: bytes) -> bytes:
        """Plaintext up to and including ``marker`` (the connection stays open)."""
        out = bytearray()
        while marker not in out:
            try:
                out += self._tls.read(1 << 16)
            except ssl.SSLWantReadError:
                assert await self._receive(), "closed before the marker"
        return bytes(out)

    async def send(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    async def read_to_end(self) -> bytes:
        """The plaintext up to the server's close_notify, answered with ours (asyncio's
        server waits for it before it closes), then the wire counted up to its EOF."""
        out = bytearray()
        while True:
            try:
                chunk = self._tls.read(1 << 16)
            except ssl.SSLWantReadError:
                if not await self._receive():
                    break
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:  # the close_notify (an SSLObject reads it as b"")
                break
            out += chunk
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        await self._flush()
        while data := await self._reader.read(1 << 16):
            self.wire_in += len(data)
        return bytes(out)


@dataclass
class Fetched:
    client_port: int
    raw: bytes = b""
    """The HTTP response, decrypted."""
    wire_down: int = 0
    """Bytes that came from the proxy after its 200: the TLS records, as on the wire."""
    error: ssl.SSLError | None = None


def connect_head(port: int, host_line: str = "Host: x", ip: str = "127.0.0.1") -> bytes:
    authority = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return f"CONNECT {authority} HTTP/1.1\r\n{host_line}\r\n\r\n".encode()


SLOW_RCVBUF = 16 * 1024
"""A slow client's receive buffer: the proxy's writes to it fill it and must wait for room."""


async def open_tunnel(lab: NativeLab, head: bytes, *,
                      slow: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A CONNECT answered with 200. ``slow``: a small receive buffer (set before the
    connect, so the window stays small)."""
    if slow:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", lab.port))
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", lab.port)
    writer.write(head)
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    return reader, writer, writer.get_extra_info("sockname")[1]


async def tls_fetch(lab: NativeLab, sni: str | None, path: str = "/page", head: bytes | None = None, *,
                    slow: bool = False) -> Fetched:
    """GET ``path`` with ``sni`` through a CONNECT to the TLS origin, to the end
    (``slow``: a client that reads late, through a small receive buffer)."""
    head = head or connect_head(lab.origin.tls_port)
    async with asyncio.timeout(10):
        reader, writer, port = await open_tunnel(lab, head, slow=slow)
        tls = WireTls(reader, writer, sni)
        try:
            await tls.handshake()
        except ssl.SSLError as exc:
            writer.close()
            return Fetched(port, wire_down=tls.wire_in, error=exc)
        await tls.send(f"GET {path} HTTP/1.1\r\nHost: {sni or 'x'}\r\nConnection: close\r\n\r\n".encode())
        if slow:
            await asyncio.sleep(0.2)  # the response fills the client's buffer meanwhile
        raw = await tls.read_to_end()
        writer.close()
        return Fetched(port, raw, tls.wire_in)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def comparable(record: Record) -> dict[str, Any]:
    return {k: v for k, v in msgspec.structs.asdict(record).items() if k not in VARYING}


def by_port(records: list[Any]) -> dict[int, Any]:
    out = {r.client_port: r for r in records}
    assert len(out) == len(records), "one record of the kind a connection"
    return out


async def fetch_records(lab: NativeLab, n: int) -> tuple[dict[int, Any], dict[int, Any]]:
    """(tls records, conn records) by client port, once ``n`` conn records are stored."""
    conns = by_port(await lab.records("conn", n))
    tlss = by_port(await lab.records("tls", 0))
    assert len(conns) == n, conns
    return tlss, conns


def assert_same_as_first(first: int, later: list[int], *kinds: dict[int, Any]) -> None:
    for records in kinds:
        for port in later:
            assert comparable(records[port]) == comparable(records[first]), port


# -- 1. same bytes, same records ------------------------------------------------------------


@pytest.mark.parametrize(("ip", "sni"), [("127.0.0.1", ALLOWED), ("::1", ALLOWED), ("127.0.0.1", None)])
async def test_later_connections_go_through_c_and_get_the_first_ones_records(
        tmp_path: Path, server_ctx: ssl.SSLContext, ip: str, sni: str | None) -> None:
    async with running(tmp_path, server_ctx) as lab:
        port = lab.origin.tls_port if ip == "127.0.0.1" else lab.origin.tls6_port
        got = [await tls_fetch(lab, sni, head=connect_head(port, ip=ip)) for _ in range(3)]
        tlss, conns = await fetch_records(lab, 3)
    first, *later = [g.client_port for g in got]
    assert all(g.raw == ROUTES["/page"] for g in got)
    assert lab.path_of(first) == ["handoff"]  # the memos were empty: the Python path decided
    assert all(lab.path_of(p) == ["connected", "finished"] for p in later)
    assert_same_as_first(first, later, tlss, conns)
    peers = {p for p, _ in lab.origin.seen}
    for g in got:
        t, c = tlss[g.client_port], conns[g.client_port]
        assert (t.sni, t.action, t.rule_ids, t.ruleset_version, t.tls_version) == (sni, "allow", [], 7, "TLSv1.3")
        assert (c.service, c.close_reason, c.server_ip, c.server_port) == ("tls", "fin", ip, port)
        assert c.nat_ip == ip and c.nat_port in peers and (t.nat_ip, t.nat_port) == (c.nat_ip, c.nat_port)
        assert c.bytes_down == g.wire_down and c.bytes_up > len(connect_head(0))
        assert t.uid == c.uid and c.ts <= t.ts <= c.ts_end
        assert bool(c.community_id) == (ip == "127.0.0.1")  # none for an IPv4 client and an IPv6 server


@pytest.mark.parametrize("how", ["together", "pieces"])
async def test_c_reads_a_head_and_hello_that_come_together_or_in_pieces(
        tmp_path: Path, server_ctx: ssl.SSLContext, how: str) -> None:
    """Together: a client that sends its hello without waiting for the 200. Pieces:
    the head over two reads, the hello over two segments. C waits for the rest (or
    reads past the head) and carries them as the Python path did the first one."""
    async with running(tmp_path, server_ctx) as lab:
        head = connect_head(lab.origin.tls_port)
        ports = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", lab.port)
            hello = _client_hello(ALLOWED)
            pieces = [head + hello] if how == "together" else [head[:12], head[12:], hello[:40], hello[40:]]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            async with asyncio.timeout(10):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                assert (await reader.readexactly(5))[:2] == b"\x16\x03"  # the origin's ServerHello
            writer.close()
            ports.append(writer.get_extra_info("sockname")[1])
        tlss, conns = await fetch_records(lab, 2)
    python, c_port = ports
    assert lab.path_of(python) == ["handoff"] and lab.path_of(c_port) == ["connected", "finished"]
    assert conns[python].bytes_up == len(head) + len(hello) and tlss[python].sni == ALLOWED
    assert_same_as_first(python, [c_port], tlss, conns)


async def test_http_inside_a_remembered_tunnel_goes_on_in_python_after_cs_200(
        tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    """C answers a head it knows, then meets no hello: the Python path goes on from the
    tunnel's first bytes (``Resume.connect_head``), with the records it wrote the first time."""
    async with running(tmp_path, server_ctx) as lab:
        head = connect_head(lab.origin.port)
        ports = []
        for _ in range(2):
            reader, writer, port = await open_tunnel(lab, head)
            writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(10):
                assert await reader.read() == ROUTES["/page"]
            writer.close()
            ports.append(port)
        https = by_port(await lab.records("http", 2))
        _, conns = await fetch_records(lab, 2)
    python, c_port = ports
    assert lab.path_of(python) == ["handoff"] and lab.path_of(c_port) == ["handoff"]
    assert conns[python].bytes_up > len(head) and conns[python].service == "http"
    assert_same_as_first(python, [c_port], conns, https)


@pytest.mark.parametrize("side", ["server", "client"])
async def test_a_reset_in_the_relay_is_recorded_as_on_the_python_path(
        tmp_path: Path, server_ctx: ssl.SSLContext, side: str) -> None:
    """``server``: the origin resets after reading the hello; ``client``: the client
    resets once the origin's first flight reached it. Both paths record "rst"."""
    hello = _client_hello(ALLOWED)

    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(hello))
        _abort(writer)

    srv = await asyncio.start_server(resetting, "127.0.0.1", 0)
    try:
        async with running(tmp_path, server_ctx) as lab:
            port = srv.sockets[0].getsockname()[1] if side == "server" else lab.origin.tls_port
            ports = []
            for _ in range(2):
                reader, writer, client_port = await open_tunnel(lab, connect_head(port))
                async with asyncio.timeout(10):
                    if side == "server":
                        writer.write(hello)
                        with contextlib.suppress(ConnectionError):
                            assert await reader.read() == b""
                    else:  # reset once the origin's whole flight is in, before the client's Finished
                        await WireTls(reader, writer, ALLOWED).handshake(finish=False)
                _abort(writer)
                ports.append(client_port)
            tlss, conns = await fetch_records(lab, 2)
    finally:
        srv.close()
    python, c_port = ports
    assert lab.path_of(python) == ["handoff"] and lab.path_of(c_port) == ["connected", "finished"]
    assert conns[python].close_reason == "rst"
    assert_same_as_first(python, [c_port], tlss, conns)


# -- 2. a blocked name ---------------------------------------------------------------------


async def test_a_blocked_name_gets_the_alert_from_c_and_the_same_records(
        tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    async with running(tmp_path, server_ctx) as lab:
        got = [await tls_fetch(lab, BLOCKED) for _ in range(3)]
        tlss, conns = await fetch_records(lab, 3)
    first, *later = [g.client_port for g in got]
    for g in got:
        assert g.error is not None and "ACCESS_DENIED" in str(g.error).upper(), g.error
    assert lab.path_of(first) == ["handoff"] and all(lab.path_of(p) == ["blocked"] for p in later)
    assert_same_as_first(first, later, tlss, conns)
    for g in got:
        t, c = tlss[g.client_port], conns[g.client_port]
        assert (t.sni, t.action, t.rule_ids, t.ruleset_version) == (BLOCKED, "block", ["D1"], 7)
        assert (c.close_reason, c.action, c.rule_ids, c.bytes_down, c.nat_port) == ("blocked", "block", ["D1"], 0,
                                                                                   None)
        assert c.bytes_up > len(connect_head(0)) and g.wire_down == 7  # the alert, nothing else
    assert lab.origin.seen == []


# -- 3. transparent mode needs nftables: tests/e2e/test_proxy_lab.py -----------------------------
# -- 4. a reload -----------------------------------------------------------------------------


async def test_a_reload_makes_c_forget_the_old_verdicts(tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    ref = EngineRef(Engine.from_dir(_rules(tmp_path, "rules", RULES)))
    stricter = dict(RULES, **{
        "ruleset.toml": RULES["ruleset.toml"].replace("version = 7", "version = 8"),
        "domains.tsv": RULES["domains.tsv"] + "D3\tgambling\tallowed.example\n",
    })
    async with running(tmp_path, server_ctx, engine=ref) as lab:
        before = [await tls_fetch(lab, ALLOWED) for _ in range(2)]
        ref.swap(Engine.from_dir(_rules(tmp_path, "stricter", stricter)))
        after = [await tls_fetch(lab, ALLOWED) for _ in range(2)]
        tlss, conns = await fetch_records(lab, 4)
    assert [lab.path_of(g.client_port) for g in before] == [["handoff"], ["connected", "finished"]]
    assert [g.raw == ROUTES["/page"] for g in before] == [True, True]
    # The new Engine decides the next one (Python), and C applies the new verdict after it.
    assert [lab.path_of(g.client_port) for g in after] == [["handoff"], ["blocked"]]
    for g in after:
        assert g.error is not None and "ACCESS_DENIED" in str(g.error).upper(), g.error
        t, c = tlss[g.client_port], conns[g.client_port]
        assert (t.action, t.rule_ids, t.ruleset_version) == ("block", ["D3"], 8)
        assert (c.close_reason, c.rule_ids, c.ruleset_version) == ("blocked", ["D3"], 8)
    assert len(lab.origin.seen) == 2


# -- 5. bulk, half-close, relay modes -----------------------------------------------------


@pytest.mark.parametrize("relay", ["auto", "splice", "copy"])
async def test_a_bulk_tls_download_through_c_is_byte_identical_and_counted(
        tmp_path: Path, server_ctx: ssl.SSLContext, relay: str) -> None:
    async with running(tmp_path, server_ctx, relay=relay) as lab:
        got = [await tls_fetch(lab, ALLOWED, "/bulk", slow=True) for _ in range(2)]
        tlss, conns = await fetch_records(lab, 2)
    python, c_port = got[0].client_port, got[1].client_port
    assert lab.path_of(python) == ["handoff"] and lab.path_of(c_port) == ["connected", "finished"]
    for g in got:
        assert g.raw == ROUTES["/bulk"]
        assert conns[g.client_port].bytes_down == g.wire_down > len(BULK)  # the TLS bytes on the wire
    assert_same_as_first(python, [c_port], tlss, conns)


async def _half_closed_exchange(lab: NativeLab, port: int, up: bytes) -> tuple[int, bytes]:
    """A tunnel whose client sends ``up`` (a hello first) and then its FIN; returns the
    client's port and what came back until the origin closed."""
    reader, writer, client_port = await open_tunnel(lab, connect_head(port), slow=True)
    writer.write(up)
    writer.write_eof()
    await asyncio.sleep(0.2)  # a slow reader: the answer fills its buffer meanwhile
    async with asyncio.timeout(20):
        down = await reader.read()
    writer.close()
    return client_port, down


@pytest.mark.parametrize("relay", ["auto", "splice", "copy"])
async def test_a_half_close_and_bulk_both_ways_pass_through_c_counted_exactly(
        tmp_path: Path, server_ctx: ssl.SSLContext, relay: str) -> None:
    # After the hello the relay carries bytes, whatever they are: the origin reads
    # until the client's FIN (which only a half-close through the proxy brings), then
    # answers with BULK and closes. Both directions pass SPLICE_AFTER.
    hello = _client_hello(ALLOWED)
    up = bytes(range(255, -1, -1)) * 2400  # 600 KiB
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())
        writer.write(BULK)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with running(tmp_path, server_ctx, relay=relay) as lab:
            ports = [(await _half_closed_exchange(lab, port, hello + up)) for _ in range(2)]
            tlss, conns = await fetch_records(lab, 2)
    finally:
        srv.close()
    (python, _), (c_port, _) = ports
    assert lab.path_of(python) == ["handoff"] and lab.path_of(c_port) == ["connected", "finished"]
    assert received == [hello + up] * 2 and [down for _, down in ports] == [BULK] * 2
    head = connect_head(port)
    for p in (python, c_port):
        c = conns[p]
        assert (c.bytes_up, c.bytes_down, c.close_reason) == (len(head) + len(hello) + len(up), len(BULK), "fin")
    assert_same_as_first(python, [c_port], tlss, conns)


# -- 6. connect failures --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _two_failed_connects(lab: NativeLab, port: int) -> list[int]:
    """Two tunnels to ``port`` whose connect fails: the first on the Python path, the
    second through C. Each client sees its connection closed; their client ports."""
    ports = []
    for _ in range(2):
        reader, writer, client_port = await open_tunnel(lab, connect_head(port))
        writer.write(_client_hello(ALLOWED))
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
        ports.append(client_port)
    return ports


async def _refused(tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    port = _free_port()  # nothing listens there any more
    async with running(tmp_path, server_ctx) as lab:
        ports = await _two_failed_connects(lab, port)
        tlss, conns = await fetch_records(lab, 2)
    python, c_port = ports
    assert lab.path_of(python) == ["handoff"] and lab.path_of(c_port) == ["failed"]
    assert conns[python].close_reason.startswith(f"error: connect 127.0.0.1:{port}: [Errno 111] ")
    assert_same_as_first(python, [c_port], tlss, conns)
    assert tlss[c_port].sni == ALLOWED and tlss[c_port].nat_port is None


def test_a_refused_connect_through_c_is_recorded_as_on_the_python_path_on_uvloop(
        tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    """uvloop: the loop ``linewarden run`` serves on. In a child process: uvloop resolves
    through libuv's thread pool, whose threads outlive the loop, and later tests fork."""
    import multiprocessing

    cert, key = server_ctx.lw_files  # type: ignore[attr-defined]
    child = multiprocessing.get_context("spawn").Process(target=_refused_on_uvloop, args=(tmp_path, cert, key))
    child.start()
    child.join(60)
    assert child.exitcode == 0


def _refused_on_uvloop(tmp_path: Path, cert: Path, key: Path) -> None:
    import uvloop

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    uvloop.run(_refused(tmp_path, ctx))


def test_a_refused_connect_through_c_is_recorded_as_on_the_python_path_on_asyncio(
        tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    """asyncio's own loop words the error "Connect call failed (...)": the record does not."""
    asyncio.run(_refused(tmp_path, server_ctx))


async def test_a_connect_timeout_through_c_is_recorded_as_on_the_python_path(
        tmp_path: Path, server_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import fastpath

    monkeypatch.setattr(fastpath, "WAIT_SWEEP_S", 0.05)
    srv, fillers = _unanswered_listener()
    port = srv.getsockname()[1]
    try:
        async with running(tmp_path, server_ctx, connect_timeout=0.3) as lab:
            ports = await _two_failed_connects(lab, port)
            tlss, conns = await fetch_records(lab, 2)
    finally:
        for s in (srv, *fillers):
            s.close()
    python, c_port = ports
    assert lab.path_of(python) == ["handoff"] and lab.path_of(c_port) == ["failed"]
    assert conns[python].close_reason == f"error: connect 127.0.0.1:{port}: "
    assert_same_as_first(python, [c_port], tlss, conns)
    for p, path in ((python, "python"), (c_port, "C")):
        # The conn record ends when the connect gave up, not when it started.
        assert conns[p].ts_end - tlss[p].ts >= 300_000, (path, conns[p].ts_end - tlss[p].ts)


# -- 7. shutdown ----------------------------------------------------------------------


async def test_a_connection_c_relays_is_recorded_as_shutdown_when_the_proxy_stops(
        tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    async with running(tmp_path, server_ctx) as lab:
        assert (await tls_fetch(lab, ALLOWED)).raw == ROUTES["/page"]
        # Open and in the middle of a response: one through C (the remembered head), one
        # through the Python path (a head of the same length C has not seen). The head of
        # the response came back: everything either side sent so far went through.
        open_ = []
        for head in (connect_head(lab.origin.tls_port), connect_head(lab.origin.tls_port, "Host: y")):
            reader, writer, port = await open_tunnel(lab, head)
            tls = WireTls(reader, writer, ALLOWED)
            async with asyncio.timeout(10):
                await tls.handshake()
                await tls.send(f"GET /hold HTTP/1.1\r\nHost: {ALLOWED}\r\n\r\n".encode())
                assert await tls.read_until(b"\r\n\r\n") == HOLD_HEAD
            open_.append((reader, writer, port))
        await lab.proxy.stop()
        for reader, writer, _ in open_:
            async with asyncio.timeout(5):
                await reader.read()  # to EOF: the proxy closed its side
            writer.close()
        tlss, conns = await fetch_records(lab, 3)
    (_, _, c_port), (_, _, python) = open_
    assert lab.path_of(c_port) == ["connected", "finished"] and lab.path_of(python) == ["handoff"]
    assert conns[c_port].close_reason == conns[python].close_reason == "shutdown"
    assert conns[c_port].bytes_down > 0 and tlss[c_port].sni == ALLOWED
    assert_same_as_first(python, [c_port], tlss, conns)


# -- 8. handed over: plain HTTP -----------------------------------------------------------------


async def test_plain_http_is_handed_to_python_and_recorded(tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    async with running(tmp_path, server_ctx) as lab:
        reader, writer = await asyncio.open_connection("127.0.0.1", lab.port)
        p = lab.origin.port
        writer.write(f"GET http://127.0.0.1:{p}/page HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n"
                     "Connection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            raw = await reader.read()
        writer.close()
        client_port = writer.get_extra_info("sockname")[1]
        [h] = await lab.records("http", 1)
        [c] = await lab.records("conn", 1)
    assert raw == ROUTES["/page"] and lab.path_of(client_port) == ["handoff"]
    assert (h.url, h.status, h.uid) == (f"http://127.0.0.1:{p}/page", 200, c.uid)
    assert (c.service, c.close_reason, c.bytes_down, c.client_port) == ("http", "fin", len(raw), client_port)


# -- 9. clients that end early ------------------------------------------------------------------


async def _early_ends(lab: NativeLab) -> list[tuple[str, int]]:
    """Connections that end before any TLS; returns (case, client port) of each."""
    head = connect_head(9, "Host: early")  # never connected to: no hello follows
    cases = [("silent", b""), ("half-head", head[:20]), ("head", head), ("head-again", head)]
    out = []
    for case, data in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", lab.port)
        writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(10):
            await reader.read()
        writer.close()
        out.append((case, writer.get_extra_info("sockname")[1]))
    return out


async def test_clients_that_end_early_get_the_records_of_the_python_path(
        tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    records: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in ("python", "native"):
        (tmp_path / mode).mkdir()
        async with running(tmp_path / mode, server_ctx, native=mode == "native") as lab:
            cases = await _early_ends(lab)
            conns = by_port(await lab.records("conn", len(cases)))
        records[mode] = {case: comparable(conns[port]) for case, port in cases}
        if mode == "native":
            # The remembered head (answered by the Python path the first time) and its EOF: C's.
            assert [lab.path_of(port) for _, port in cases] == [["early"], ["handoff"], ["handoff"], ["early"]]
    assert records["native"] == records["python"]
    python = records["python"]
    assert (python["silent"]["close_reason"], python["silent"]["service"], python["silent"]["bytes_up"]) == (
        "fin", None, 0)
    assert (python["head-again"]["service"], python["head-again"]["server_port"]) == ("http", 9)


@pytest.mark.parametrize("mode", ["python", "native"])
async def test_a_client_that_resets_after_its_first_bytes_is_recorded_with_its_address(
        tmp_path: Path, server_ctx: ssl.SSLContext, mode: str) -> None:
    """The Python path takes the client's address from accept(); a connection C hands
    over must keep the one C's accept gave, since by the time the loop adopts the
    descriptor a reset client has no peer name left to ask for."""
    async with running(tmp_path, server_ctx, native=mode == "native") as lab:
        # A blocking socket on the loop's thread: the reset is sent before the loop runs again.
        with socket.create_connection(("127.0.0.1", lab.port), timeout=5) as s:
            s.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            port = s.getsockname()[1]
        [c] = await lab.records("conn", 1)
    assert (c.client_ip, c.client_port) == ("127.0.0.1", port)
    if mode == "native":
        assert lab.path_of(port) == ["handoff"]
