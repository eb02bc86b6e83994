"""The relay between two sockets (proxy/relay.py), over real loopback sockets.

Each test runs against the three relays: the socket relay splicing
(``splice(2)`` through pipes) and copying (through a buffer) from the start,
the transports' own, which goes on when the socket relay cannot take over (no
descriptors left), and the product's way, the transports handing over to the
socket relay after ``RELAY_AFTER`` bytes (made small here, so that the bulk
tests hand over in mid-transfer). A "client" connects to a listener whose accepted side is ``a``; ``b`` is
a connection to an "origin"; the test drives both outer ends with asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from proxy import relay
from proxy.relay import RelayMode, Side, splice, spliced

pytestmark = pytest.mark.e2e


@dataclass
class Pair:
    """A spliced connection: client ↔ a ≈ b ↔ origin."""

    a: Side
    b: Side
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    origin: tuple[asyncio.StreamReader, asyncio.StreamWriter]


HANDOVER_AFTER = 64 * 1024
"""``RELAY_AFTER`` of the "handover" kind: less than the bulk tests send."""


def out_of_descriptors(*args: object) -> None:
    raise OSError(24, "Too many open files")


@pytest.fixture(params=["splice", "copy", "transport", "handover"])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "transport":
        monkeypatch.setattr(relay, "SocketRelay", out_of_descriptors)
    elif request.param == "handover":
        monkeypatch.setattr(relay, "RELAY_AFTER", HANDOVER_AFTER)
    else:
        if request.param == "splice" and not hasattr(os, "splice"):
            pytest.skip("no os.splice on this platform")
        monkeypatch.setattr(relay, "RELAY_AFTER", 0)  # the socket relay from the start
    return str(request.param)


def mode(kind: str) -> RelayMode:
    """The mode that gives ``kind``: both peers are on this host, so "auto" would copy.
    A hand-over splices (copies where ``os.splice`` is missing)."""
    return "splice" if kind in ("splice", "handover") else "copy"


def flow_types(side: Side) -> list[type]:
    assert side.relay is not None
    return [type(f) for f in side.relay.flows]


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[], asyncio.Future[Pair]]]:
    """Makes connected (not yet spliced) pairs; closes everything at the end."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[Side] = asyncio.Queue()
    origins: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    def accept() -> Side:
        side = Side()
        accepted.put_nowait(side)
        return side

    listener = await loop.create_server(accept, "127.0.0.1", 0)
    origin = await asyncio.start_server(lambda r, w: origins.put_nowait((r, w)), "127.0.0.1", 0)
    writers: list[asyncio.StreamWriter] = []

    async def make() -> Pair:
        client = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
        a = await accepted.get()
        _, b = await loop.create_connection(Side, "127.0.0.1", origin.sockets[0].getsockname()[1])
        o = await origins.get()
        writers.extend([client[1], o[1]])
        return Pair(a, b, client, o)

    yield make  # type: ignore[misc]
    for w in writers:
        w.close()
    listener.close()
    origin.close()


async def _pump(writer: asyncio.StreamWriter, data: bytes, *, eof: bool) -> None:
    for i in range(0, len(data), 100_000):
        writer.write(data[i : i + 100_000])
        await writer.drain()
    if eof:
        writer.write_eof()


async def _relay_both_ways(p, up: bytes, down: bytes) -> None:  # type: ignore[no-untyped-def]
    """Run ``p``'s relay while ``up`` goes client → origin and ``down`` back at once, each
    ended with a FIN; both arrive whole and are counted."""
    run = asyncio.ensure_future(spliced(p.a, p.b))
    async with asyncio.timeout(30):
        got_up, got_down, *_ = await asyncio.gather(
            p.origin[0].read(), p.client[0].read(),
            _pump(p.client[1], up, eof=True), _pump(p.origin[1], down, eof=True))
        await run
    assert (got_up, got_down) == (up, down)
    assert (p.a.bytes_in, p.b.bytes_in) == (len(up), len(down))


async def test_bytes_arrive_identical_both_ways_and_are_counted(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    up, down = os.urandom(3 << 20), os.urandom(5 << 20)
    splice(p.a, p.b, mode(kind))
    assert (p.a.relay is not None) == (kind in ("splice", "copy"))
    await _relay_both_ways(p, up, down)
    assert not p.a.reset and not p.b.reset


async def test_bytes_read_while_sniffing_go_first(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    p.client[1].write(b"hello, ")
    async with asyncio.timeout(10):
        while len(p.a.buf) < 7:
            await p.a.wait_more()
    splice(p.a, p.b, mode(kind))
    run = asyncio.ensure_future(spliced(p.a, p.b))
    p.client[1].write(b"world")
    p.client[1].write_eof()
    p.origin[1].write_eof()
    async with asyncio.timeout(10):
        assert await p.origin[0].read() == b"hello, world"
        await run
    assert p.a.bytes_in == 12


async def test_half_close_lets_the_other_direction_finish(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    splice(p.a, p.b, mode(kind))
    run = asyncio.ensure_future(spliced(p.a, p.b))
    p.client[1].write(b"request")
    p.client[1].write_eof()  # the client is done sending, not done reading
    async with asyncio.timeout(10):
        assert await p.origin[0].read() == b"request"  # EOF passed on to the origin
        assert not run.done()
        answer = os.urandom(1 << 20)
        await _pump(p.origin[1], answer, eof=True)
        assert await p.client[0].read() == answer
        await run
    assert (p.a.bytes_in, p.b.bytes_in) == (7, len(answer))
    assert p.a.transport is not None and p.a.transport.is_closing()


async def test_a_reset_ends_both_directions(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    splice(p.a, p.b, mode(kind))
    run = asyncio.ensure_future(spliced(p.a, p.b))
    p.origin[1].write(b"partial")
    async with asyncio.timeout(10):
        assert await p.client[0].readexactly(7) == b"partial"
        sock = p.origin[1].get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        p.origin[1].transport.abort()  # RST
        await run
        assert await p.client[0].read() == b""  # the client's connection was closed too
    assert p.b.reset


@pytest.mark.skipif(not hasattr(os, "splice"), reason="no os.splice on this platform")
async def test_only_a_bulk_transfer_opens_a_grown_pipe(connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    opened: list[tuple[int, int]] = []
    real_open = relay._SpliceFlow._open_pipe

    def spy(flow: relay._SpliceFlow) -> None:
        real_open(flow)
        opened.append((flow.side.bytes_in, flow.capacity))

    monkeypatch.setattr(relay._SpliceFlow, "_open_pipe", spy)
    p = await connect()
    splice(p.a, p.b, "splice")
    run = asyncio.ensure_future(spliced(p.a, p.b))
    request = os.urandom(relay.SPLICE_AFTER // 2)  # a short direction copies, no pipe
    data = os.urandom(8 << 20)
    async with asyncio.timeout(30):
        got_up, got, *_ = await asyncio.gather(p.origin[0].read(), p.client[0].read(),
                                               _pump(p.client[1], request, eof=True),
                                               _pump(p.origin[1], data, eof=True))
        await run
    assert got_up == request and got == data
    assert (p.a.bytes_in, p.b.bytes_in) == (len(request), len(data))
    # Only the bulk direction, once, after SPLICE_AFTER bytes (a refused size keeps 64 KiB).
    assert len(opened) == 1
    assert relay.SPLICE_AFTER <= opened[0][0] < len(data)
    assert opened[0][1] >= relay.PIPE_DEFAULT_BYTES


async def test_a_short_connection_stays_on_the_transports(connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A handshake and a page never pay for the socket relay's duplicates and registrations."""
    def never(*args: object) -> None:
        raise AssertionError("the socket relay was set up")

    monkeypatch.setattr(relay, "SocketRelay", never)
    p = await connect()
    splice(p.a, p.b, "auto")
    await _relay_both_ways(p, os.urandom(2000), os.urandom(relay.RELAY_AFTER - 1))
    assert p.a.relay is None and p.a.joined is None and p.b.joined is None


async def test_the_socket_relay_takes_over_after_relay_after_bytes(connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Once a side has received ``RELAY_AFTER`` bytes the socket relay carries the rest,
    after what the transports still held, in order and counted."""
    started: list[tuple[int, int]] = []
    real = relay.SocketRelay

    def spy(a: Side, b: Side, mode_: RelayMode) -> relay.SocketRelay:
        started.append((a.bytes_in, b.bytes_in))
        return real(a, b, mode_)

    monkeypatch.setattr(relay, "SocketRelay", spy)
    p = await connect()
    splice(p.a, p.b, "copy")
    assert p.a.relay is None
    run = asyncio.ensure_future(spliced(p.a, p.b))
    request, first, rest = os.urandom(3000), os.urandom(2 * relay.RELAY_AFTER), os.urandom(6 * relay.RELAY_AFTER)
    async with asyncio.timeout(30):
        got = asyncio.gather(p.origin[0].read(), p.client[0].read())
        await _pump(p.client[1], request, eof=True)
        await _pump(p.origin[1], first, eof=False)
        for _ in range(1000):  # bounded: the hand-over comes within a few turns of the loop
            if p.a.relay is not None:
                break
            await asyncio.sleep(0.005)
        assert p.a.relay is not None  # the rest goes through the socket relay
        await _pump(p.origin[1], rest, eof=True)
        got_up, got_down = await got
        await run
    assert (got_up, got_down) == (request, first + rest)
    assert (p.a.bytes_in, p.b.bytes_in) == (len(request), len(first) + len(rest))
    assert len(started) == 1 and relay.RELAY_AFTER <= started[0][1] <= len(first)


async def test_bytes_the_transport_still_holds_go_out_before_the_relay(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    head = os.urandom(16 << 20)  # more than the socket buffers take: the transport keeps the rest
    assert p.a.transport is not None
    p.a.transport.write(head)
    assert p.a.transport.get_write_buffer_size() > 0
    splice(p.a, p.b, mode(kind))
    run = asyncio.ensure_future(spliced(p.a, p.b))
    body = os.urandom(1 << 20)
    async with asyncio.timeout(30):
        got, *_ = await asyncio.gather(p.client[0].read(), _pump(p.origin[1], body, eof=True))
        p.client[1].write_eof()
        await run
    assert got == head + body


async def test_a_slow_reader_holds_back_the_sender(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    """Back-pressure: while the client does not read, the relay stops reading the
    origin, so what it holds stays bounded; then everything arrives, in order."""
    p = await connect()
    splice(p.a, p.b, mode(kind))
    run = asyncio.ensure_future(spliced(p.a, p.b))
    data = os.urandom(64 << 20)  # far more than the socket buffers and the relay hold
    pump = asyncio.ensure_future(_pump(p.origin[1], data, eof=True))
    async with asyncio.timeout(60):
        await asyncio.sleep(0.3)
        assert not pump.done()  # the origin is blocked: nothing buffers 64 MiB for it
        if kind != "transport":
            held = sum(len(f.pending) + getattr(f, "in_pipe", 0) for f in p.a.relay.flows)
            assert held <= max(relay.COPY_BYTES, relay.PIPE_BYTES)
        got = await p.client[0].read()
        await pump
        p.client[1].write_eof()
        await run
    assert got == data and p.b.bytes_in == len(data)


async def test_a_failed_write_resets_and_ends_both(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    """The client goes away (RST) while the origin is still sending: the relay ends."""
    p = await connect()
    splice(p.a, p.b, mode(kind))
    run = asyncio.ensure_future(spliced(p.a, p.b))
    sock = p.client[1].get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    p.client[1].transport.abort()  # RST towards a
    async with asyncio.timeout(10):
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # bounded: the relay's end reaches the origin long before
                p.origin[1].write(os.urandom(1 << 16))
                await p.origin[1].drain()
                if run.done():
                    break
                await asyncio.sleep(0.01)
        await run
        assert await p.origin[0].read() == b""  # the origin's connection was closed too
    assert p.a.reset


@pytest.mark.skipif(not hasattr(os, "splice"), reason="no os.splice on this platform")
@pytest.mark.parametrize(("local_ends", "flow"), [(2, "_CopyFlow"), (1, "_CopyFlow"), (0, "_SpliceFlow")])
async def test_auto_splices_only_between_two_other_hosts(local_ends: int, flow: str, connect,  # type: ignore[no-untyped-def]
                                                        monkeypatch) -> None:
    p = await connect()
    # Both ends are on loopback; make the relay see ``local_ends`` of them as this host.
    local = [p.a, p.b][:local_ends]
    ports = {s.transport.get_extra_info("peername")[1] for s in local if s.transport is not None}
    monkeypatch.setattr(relay, "_on_this_host", lambda sock: sock.getpeername()[1] in ports)
    splice(p.a, p.b, after=0)  # mode "auto", the socket relay from the start
    assert flow_types(p.a) == [getattr(relay, flow)] * 2
    await _relay_both_ways(p, os.urandom(1 << 20), os.urandom(1 << 20))


async def test_this_host_is_loopback_or_our_own_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as c:
            assert relay._on_this_host(c)
    a, b = socket.socketpair()
    with a, b:
        assert relay._on_this_host(a)  # a Unix socket: always this host
    with socket.socket() as unconnected:
        assert not relay._on_this_host(unconnected)


@pytest.mark.parametrize(("addr", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1", False), ("1270::1", False), ("::", False),
])
def test_loopback_addresses(addr: str, loopback: bool) -> None:
    assert relay._loopback(addr) == loopback


@pytest.mark.parametrize(("mode_", "local", "spliced_"), [
    ("splice", True, True), ("splice", False, True),
    ("copy", True, False), ("copy", False, False),
    ("auto", True, False), ("auto", False, True),
])
def test_use_splice(mode_: RelayMode, local: bool, spliced_: bool) -> None:
    assert relay._use_splice(mode_, local) == (spliced_ and hasattr(os, "splice"))


async def test_copying_relays_share_one_buffer_without_mixing_bytes(connect) -> None:  # type: ignore[no-untyped-def]
    """Every copying flow of a thread reads into the same buffer; what one flow's
    ``dst`` did not take is kept apart (``pending``) before another flow reads."""
    pairs = [await connect() for _ in range(4)]
    data = [os.urandom(4 << 20) for _ in pairs]
    runs = []
    for p in pairs:
        splice(p.a, p.b, "copy", after=0)
        assert p.a.relay is not None and p.a.relay.flows[0].buf is pairs[0].a.relay.flows[0].buf
        runs.append(asyncio.ensure_future(spliced(p.a, p.b)))
    async with asyncio.timeout(60):
        got = await asyncio.gather(*(p.client[0].read() for p in pairs),
                                   *(_pump(p.origin[1], d, eof=True) for p, d in zip(pairs, data)),
                                   *(_pump(p.client[1], b"", eof=True) for p in pairs))
        await asyncio.gather(*runs)
    assert list(got[: len(pairs)]) == data
    assert [p.b.bytes_in for p in pairs] == [len(d) for d in data]


@pytest.mark.skipif(not hasattr(os, "splice"), reason="no os.splice on this platform")
async def test_splice_without_descriptors_for_a_pipe_keeps_copying(connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_pipe(flags: int) -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    p = await connect()
    monkeypatch.setattr(os, "pipe2", no_pipe)
    splice(p.a, p.b, "splice", after=0)
    assert flow_types(p.a) == [relay._SpliceFlow, relay._SpliceFlow]
    assert p.a.relay is not None
    down = p.a.relay.flows[1]
    run = asyncio.ensure_future(spliced(p.a, p.b))
    data = os.urandom(4 * relay.SPLICE_AFTER)
    async with asyncio.timeout(30):
        got, *_ = await asyncio.gather(p.client[0].read(), _pump(p.origin[1], data, eof=True),
                                       _pump(p.client[1], b"", eof=True))
        await run
    assert got == data and p.b.bytes_in == len(data)
    assert isinstance(down, relay._SpliceFlow) and not down.may_pipe  # it tried, and copied on


async def test_a_read_times_out_only_when_nothing_comes(connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await p.a.read(0.1)
    assert 0.09 <= loop.time() - started < 2
    p.client[1].write(b"late but in time")
    assert await p.a.read(5) == b"late but in time"
    loop.call_later(0.05, p.client[1].write, b"x")
    assert await p.a.read(5) == b"x"  # woken by the data, the timer cancelled
    await asyncio.sleep(0.1)
    p.client[1].write_eof()
    assert await p.a.read(5) == b""  # EOF is an answer too, not a timeout
