"""The relay between two sockets (proxy/relay.py), over real loopback sockets.

Each test runs against both relays: the kernel one (``splice(2)`` through pipes)
and the transports' own, which takes over where ``os.splice`` is missing.
A "client" connects to a listener whose accepted side is ``a``; ``b`` is a
connection to an "origin"; the test drives both outer ends with asyncio streams.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from proxy import relay
from proxy.relay import Side, splice, spliced

pytestmark = pytest.mark.e2e


@dataclass
class Pair:
    """A spliced connection: client ↔ a ≈ b ↔ origin."""

    a: Side
    b: Side
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    origin: tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(params=["kernel", "transport"])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "transport":
        monkeypatch.setattr(relay, "_HAVE_SPLICE", False)
    elif not hasattr(os, "splice"):
        pytest.skip("no os.splice on this platform")
    return str(request.param)


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


async def test_bytes_arrive_identical_both_ways_and_are_counted(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    up, down = os.urandom(3 << 20), os.urandom(5 << 20)
    splice(p.a, p.b)
    assert (p.a.relay is not None) == (kind == "kernel")
    run = asyncio.ensure_future(spliced(p.a, p.b))
    async with asyncio.timeout(30):
        # Both directions at once, each ended with a FIN.
        got_up, got_down, *_ = await asyncio.gather(
            p.origin[0].read(), p.client[0].read(),
            _pump(p.client[1], up, eof=True), _pump(p.origin[1], down, eof=True))
        await run
    assert got_up == up and got_down == down
    assert (p.a.bytes_in, p.b.bytes_in) == (len(up), len(down))
    assert not p.a.reset and not p.b.reset


async def test_bytes_read_while_sniffing_go_first(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    p.client[1].write(b"hello, ")
    async with asyncio.timeout(10):
        while len(p.a.buf) < 7:
            await p.a.wait_more()
    splice(p.a, p.b)
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
    splice(p.a, p.b)
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
    splice(p.a, p.b)
    run = asyncio.ensure_future(spliced(p.a, p.b))
    p.origin[1].write(b"partial")
    async with asyncio.timeout(10):
        assert await p.client[0].readexactly(7) == b"partial"
        sock = p.origin[1].get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        p.origin[1].transport.abort()  # RST
        await run
        assert await p.client[0].read() == b""  # the client's connection was closed too
    if kind == "kernel":
        assert p.b.reset


@pytest.mark.skipif(not hasattr(os, "splice"), reason="no os.splice on this platform")
async def test_bulk_transfer_grows_the_pipe(connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    grown: list[int] = []
    real_grow = relay._Flow._grow

    def spy(flow: relay._Flow) -> None:
        real_grow(flow)
        grown.append(flow.capacity)

    monkeypatch.setattr(relay._Flow, "_grow", spy)
    p = await connect()
    splice(p.a, p.b)
    run = asyncio.ensure_future(spliced(p.a, p.b))
    data = os.urandom(8 << 20)
    async with asyncio.timeout(30):
        got, _ = await asyncio.gather(p.client[0].read(), _pump(p.origin[1], data, eof=True))
        p.client[1].write_eof()
        await run
    assert got == data
    assert grown and grown[0] >= relay.PIPE_DEFAULT_BYTES  # asked once; a refusal keeps 64 KiB


async def test_bytes_the_transport_still_holds_go_out_before_the_relay(kind: str, connect) -> None:  # type: ignore[no-untyped-def]
    p = await connect()
    head = os.urandom(16 << 20)  # more than the socket buffers take: the transport keeps the rest
    assert p.a.transport is not None
    p.a.transport.write(head)
    assert p.a.transport.get_write_buffer_size() > 0
    splice(p.a, p.b)
    run = asyncio.ensure_future(spliced(p.a, p.b))
    body = os.urandom(1 << 20)
    async with asyncio.timeout(30):
        got, *_ = await asyncio.gather(p.client[0].read(), _pump(p.origin[1], body, eof=True))
        p.client[1].write_eof()
        await run
    assert got == head + body
