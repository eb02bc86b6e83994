"""Socket plumbing for the fast path: one asyncio Protocol per socket, read or spliced.

Owns: ``Side``, a Protocol that either hands received bytes to a coroutine
(``await side.read()``: sniffing a ClientHello, parsing HTTP/1) or, once
``splice(a, b)`` joins two sides, writes them straight to the other socket from
``data_received``, without a task, a coroutine switch or a copy into a buffer.
Flow control is the transports' own: when one side's write buffer passes its
high-water mark (``pause_writing``), the other side stops reading until it
drains (``resume_writing``), so a fast sender cannot fill our memory.

Must not: parse or decide anything; it counts bytes (``bytes_in``) and nothing else.
"""

from __future__ import annotations

import asyncio

READ_HIGH_WATER = 256 * 1024
"""Bytes buffered for a reading coroutine before the socket stops being read.
Bounds per-connection memory while a scan or an upstream connect is pending."""


class Side(asyncio.Protocol):
    """One socket of a proxied connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        """Received, not yet taken by ``read``."""
        self.bytes_in = 0
        """Payload bytes received on this socket so far."""
        self.eof = False
        self.lost = False
        self.peer: Side | None = None
        """Set by ``splice``: received bytes go straight to the peer's socket."""
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None:
            if peer.transport is not None and not peer.lost:
                peer.transport.write(data)
            return
        self.buf += data
        if len(self.buf) > READ_HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            # Half-close: the other direction may still be sending (RFC 9293 3.6).
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()
            if peer.eof:
                # Both directions ended: the splice is over.
                peer.close()
                self.close()
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.resume_reading()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- coroutine side -----------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_data(self) -> None:
        """Wait until ``buf`` holds bytes or the peer ended its side."""
        while not self.buf and not self.eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def wait_more(self) -> bool:
        """Wait for bytes beyond those in ``buf`` now; False at EOF."""
        have = len(self.buf)
        while len(self.buf) == have and not self.eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return len(self.buf) > have

    async def read(self) -> bytes:
        """Everything received so far (waiting for at least one byte); b"" at EOF."""
        if not self.buf:
            await self.wait_data()
        data = bytes(self.buf)
        self.buf.clear()
        if self._read_paused and self.transport is not None and not self.lost:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost and data:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while this socket's write buffer is above its high-water mark."""
        while self._write_paused and not self.lost:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Reset the connection: the peer must not take a cut body for a whole one."""
        if self.transport is not None:
            self.transport.abort()


def splice(a: Side, b: Side) -> None:
    """Join two sides: from now on each one's bytes go straight to the other.

    Bytes already buffered for a reader are forwarded first, and an EOF already
    seen is passed on, so nothing read during sniffing is lost.
    """
    a.peer, b.peer = b, a
    for src, dst in ((a, b), (b, a)):
        if src.buf:
            dst.write(bytes(src.buf))
            src.buf.clear()
        if src._read_paused and src.transport is not None and not src.lost:
            src._read_paused = False
            src.transport.resume_reading()
        if src.lost:
            dst.close()
        elif src.eof and dst.transport is not None and not dst.lost:
            if dst.transport.can_write_eof():
                dst.transport.write_eof()
    if a.eof and b.eof:
        a.close()
        b.close()
    for s, other in ((a, b), (b, a)):
        if s._write_paused and other.transport is not None:
            other.transport.pause_reading()


async def spliced(a: Side, b: Side) -> None:
    """Wait until both sockets of a splice are closed (either end closing closes both)."""
    await asyncio.wait([a.closed, b.closed], return_when=asyncio.FIRST_COMPLETED)
    a.close()
    b.close()
    await asyncio.gather(a.closed, b.closed)
