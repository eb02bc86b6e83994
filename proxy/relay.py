"""Socket plumbing for the fast path: one asyncio Protocol per socket, read or spliced.

Owns: ``Side``, a Protocol that hands received bytes to a coroutine (``await
side.read()``: sniffing a ClientHello, parsing HTTP/1), and the relay that
joins two sides once the decision is made (``splice(a, b)``, then ``await
spliced(a, b)``).

The relay is the kernel's: each direction moves socket → pipe → socket with
``splice(2)``, driven by the loop's readiness callbacks on non-blocking
sockets, so the payload is never copied into Python (no ``bytes`` object, no
``data_received`` frame per chunk): a bulk transfer costs the proxy about half
the CPU of a copying relay (benchmarks/bench_proxy.py). Bytes are counted from
what ``splice`` returns. The transports stay paused while the kernel relays:
it works on duplicates of their file descriptors (the loop refuses readers on
a transport's own descriptor), and closing the transports at the end closes
the connections. Bytes a transport still holds unsent go out first; bytes read
while sniffing (the ClientHello) are written ahead of the relay. Half-close is
passed on (RFC 9293 3.6: after one side's FIN the other direction may still be
sending); a reset or error on either side ends both.

Where the kernel relay cannot take over (no ``os.splice`` off Linux, a side
already closed, no descriptors left for the pipes), the transports relay:
``data_received`` writes straight to the other socket, and flow control is the
transports' own (``pause_writing`` on one side pauses reading on the other).

Must not: parse or decide anything; it counts bytes (``bytes_in``) and nothing else.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket

READ_HIGH_WATER = 256 * 1024
"""Bytes buffered for a reading coroutine before the socket stops being read.
Bounds per-connection memory while a scan or an upstream connect is pending."""

PIPE_BYTES = 256 * 1024
"""Capacity a relay pipe grows to (``F_SETPIPE_SZ``) once one ``splice`` fills
it: a bulk transfer then needs a quarter of the readiness callbacks and syscalls
of the default 64 KiB, while a short connection (a handshake and a page) never
pays the extra syscall. Pipe pages are only taken while bytes are in flight.
Capped by ``/proc/sys/fs/pipe-max-size`` (1 MiB by default); a smaller grant
still works."""

PIPE_DEFAULT_BYTES = 64 * 1024
"""A new pipe's capacity on Linux (16 pages)."""

SPLICE_ROUNDS = 4
"""Pipe-fulls moved per readiness callback before yielding to the loop: fewer
wake-ups on a bulk transfer, yet one fast tunnel cannot starve the others."""


class Side(asyncio.Protocol):
    """One socket of a proxied connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        """Received, not yet taken by ``read``."""
        self.bytes_in = 0
        """Payload bytes received on this socket so far (by the transport or the relay)."""
        self.eof = False
        self.lost = False
        self.reset = False
        """The peer reset the connection (or it failed) instead of closing it."""
        self.peer: Side | None = None
        """Set by the transport relay: received bytes go straight to the peer's socket."""
        self.relay: KernelRelay | None = None
        """Set by the kernel relay while it carries this socket's bytes."""

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
        if isinstance(exc, ConnectionResetError):
            self.reset = True
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


# -- the relay ---------------------------------------------------------------------


def splice(a: Side, b: Side) -> None:
    """Join two sides: from now on each one's bytes go to the other (``spliced`` runs it).

    Bytes already buffered for a reader are forwarded first, and an EOF already
    seen is passed on, so nothing read during sniffing is lost. The kernel relay
    takes over when it can; else the transports forward (module docstring).
    """
    if _HAVE_SPLICE and not a.lost and not b.lost:
        try:
            a.relay = b.relay = KernelRelay(a, b)
            return
        except OSError:
            pass  # out of descriptors for the pipes: the transports can still relay
    _transport_splice(a, b)


async def spliced(a: Side, b: Side) -> None:
    """Run the relay between ``a`` and ``b`` until it is over; both sockets are then closed."""
    relay = a.relay
    if relay is not None:
        try:
            for s in (a, b):
                await _flushed(s)
            relay.start()
            await relay.finished
        finally:
            # The relay's descriptors first; closing the transports then closes the
            # connections. Their connection_lost comes later and nothing waits for it.
            relay.stop()
            a.relay = b.relay = None
            a.close()
            b.close()
        return
    await asyncio.wait([a.closed, b.closed], return_when=asyncio.FIRST_COMPLETED)
    a.close()
    b.close()
    await asyncio.gather(a.closed, b.closed)


async def _flushed(side: Side) -> None:
    """Wait until the transport has sent what it holds (a CONNECT's 200, a 101 head):
    the kernel relay writes behind its back and must not overtake it."""
    t = side.transport
    if t is None or side.lost or not t.get_write_buffer_size():
        return
    t.set_write_buffer_limits(high=0, low=0)  # pause now, resume only once empty
    await side.drain()


def _transport_splice(a: Side, b: Side) -> None:
    """The relay through the transports (``data_received`` → the peer's ``write``)."""
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


# -- the kernel relay -----------------------------------------------------------------

_HAVE_SPLICE = hasattr(os, "splice")  # Linux, Python 3.10+
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class KernelRelay:
    """Both directions of a spliced connection, on duplicates of the sides' sockets.

    Each direction is read only while its pipe is empty and written only while
    the pipe holds bytes, so at most ``PIPE_BYTES`` are in flight per direction:
    when ``dst`` is full, ``src`` stops being read until ``dst`` drains (the
    same back-pressure the transports give).
    """

    def __init__(self, a: Side, b: Side) -> None:
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        """Done when both directions ended (or one failed)."""
        self.dups: list[socket.socket] = []
        """Duplicates of the transports' sockets (the relay's own, closed by ``stop``)."""
        self.flows: list[_Flow] = []
        try:
            sa, sb = self._socket(a), self._socket(b)
            self.flows.append(_Flow(self, a, b, sa, sb, bytes(a.buf)))
            self.flows.append(_Flow(self, b, a, sb, sa, bytes(b.buf)))
        except OSError:
            self.stop()
            raise
        for s in (a, b):
            s.buf.clear()
            if s.transport is not None:
                s.transport.pause_reading()  # from now on only the relay reads this socket

    def _socket(self, side: Side) -> socket.socket:
        assert side.transport is not None
        orig = side.transport.get_extra_info("socket")
        if orig is None or orig.fileno() < 0:
            raise OSError("transport without a socket")
        dup = socket.socket(orig.family, socket.SOCK_STREAM, 0, os.dup(orig.fileno()))
        self.dups.append(dup)
        return dup

    def start(self) -> None:
        for f in self.flows:
            if not self.finished.done():
                f.flush()  # sends what sniffing read, then starts reading

    def flow_done(self) -> None:
        if all(f.done for f in self.flows) and not self.finished.done():
            self.finished.set_result(None)

    def fail(self, side: Side) -> None:
        """A reset (or any socket error) on ``side`` ends both directions."""
        side.reset = True
        for f in self.flows:
            f.pause()
        if not self.finished.done():
            self.finished.set_result(None)

    def stop(self) -> None:
        """Unregister and close the pipes and the duplicate descriptors (idempotent)."""
        for f in self.flows:
            f.close()
        self.flows = []
        for s in self.dups:
            s.close()
        self.dups = []


class _Flow:
    """One direction of a kernel relay: ``src`` socket → pipe → ``dst`` socket."""

    __slots__ = ("relay", "side", "dst_side", "sock_out", "src", "dst", "rfd", "wfd", "capacity", "may_grow", "pending",
                 "in_pipe", "eof", "done", "reading", "writing")

    def __init__(self, relay: KernelRelay, side: Side, dst_side: Side, sock_in: socket.socket,
                 sock_out: socket.socket, pending: bytes) -> None:
        self.relay = relay
        self.side = side
        """The sending side: counts what ``src`` received (``bytes_in``), marked on EOF."""
        self.dst_side = dst_side
        self.sock_out = sock_out
        self.src, self.dst = sock_in.fileno(), sock_out.fileno()
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = PIPE_DEFAULT_BYTES
        self.may_grow = True
        self.pending = pending
        """Bytes read before the relay took over (the ClientHello): sent first."""
        self.in_pipe = 0
        self.eof = False
        self.done = False
        self.reading = self.writing = False

    def readable(self) -> None:
        """``src`` has bytes (or EOF): move up to ``SPLICE_ROUNDS`` pipe-fulls to ``dst``."""
        for _ in range(SPLICE_ROUNDS):
            try:
                n = os.splice(self.src, self.wfd, self.capacity, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError:
                self.relay.fail(self.side)
                return
            if n == 0:
                self.eof = self.side.eof = True
                self._read(False)
                self.flush()
                return
            self.side.bytes_in += n
            self.in_pipe += n
            sent_all = self._sent()
            if sent_all is None:
                return
            if not sent_all:
                self._read(False)
                self._write(True)
                return
            if n < self.capacity:
                return  # the socket is (nearly) empty: wait for the next readiness
            if self.may_grow:
                self._grow()

    def _grow(self) -> None:
        """A bulk transfer: ask once for a bigger pipe (fewer, larger splices)."""
        self.may_grow = False
        try:
            self.capacity = fcntl.fcntl(self.wfd, _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # refused (pipe-max-size, or the user's pipe quota): 64 KiB splices

    def flush(self) -> None:
        """``dst`` may take more: empty the pipe; then read again, or pass the EOF on."""
        sent_all = self._sent()
        if sent_all is None:
            return
        if not sent_all:
            self._write(True)
            return
        self._write(False)
        if not self.eof:
            self._read(True)
            return
        try:
            self.sock_out.shutdown(socket.SHUT_WR)  # half-close (RFC 9293 3.6)
        except OSError:
            pass  # the peer is gone already: its own direction reports it
        self.done = True
        self.relay.flow_done()

    def _sent(self) -> bool | None:
        """``_send``, with a failure of ``dst`` ending the relay (then None)."""
        try:
            return self._send()
        except OSError:
            self.relay.fail(self.dst_side)
            return None

    def _send(self) -> bool:
        """Write ``pending`` then the pipe to ``dst``; False when ``dst`` is full."""
        while self.pending:
            try:
                self.pending = self.pending[os.write(self.dst, self.pending):]
            except BlockingIOError:
                return False
        while self.in_pipe:
            try:
                self.in_pipe -= os.splice(self.rfd, self.dst, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
        return True

    def _read(self, on: bool) -> None:
        if on != self.reading:
            self.reading = on
            if on:
                self.relay.loop.add_reader(self.src, self.readable)
            else:
                self.relay.loop.remove_reader(self.src)

    def _write(self, on: bool) -> None:
        if on != self.writing:
            self.writing = on
            if on:
                self.relay.loop.add_writer(self.dst, self.flush)
            else:
                self.relay.loop.remove_writer(self.dst)

    def pause(self) -> None:
        self._read(False)
        self._write(False)

    def close(self) -> None:
        self.pause()
        os.close(self.rfd)
        os.close(self.wfd)
