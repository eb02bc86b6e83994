"""Socket plumbing for the fast path: one asyncio Protocol per socket, read or relayed.

Owns: ``Side``, a Protocol that hands received bytes to a coroutine (``await
side.read()``: sniffing a ClientHello, parsing HTTP/1), and the relay that
joins two sides once the decision is made (``splice(a, b)``, then ``await
spliced(a, b)``).

The relay works on the sockets themselves, driven by the loop's readiness
callbacks on non-blocking sockets, with no ``bytes`` object or
``data_received`` frame per chunk. Each direction either splices (socket →
pipe → socket with ``splice(2)``: the payload never enters user space) or
copies (``recv_into`` one reused buffer, then ``write``); ``RelayMode`` says
which, and why the answer depends on where the receiver is. Bytes are counted
from what ``splice``/``recv_into`` return. The transports stay paused while
the relay runs: it works on duplicates of their file descriptors (the loop
refuses readers on a transport's own descriptor), and closing the transports
at the end closes the connections. Bytes a transport still holds unsent go
out first; bytes read while sniffing (the ClientHello) are written ahead of
the relay. Half-close is passed on (RFC 9293 3.6: after one side's FIN the
other direction may still be sending); a reset or error on either side ends
both.

A connection starts on the transports' own relay: ``data_received`` writes
straight to the other socket, and flow control is the transports' own
(``pause_writing`` on one side pauses reading on the other). Once a side has
received ``RELAY_AFTER`` bytes, the socket relay takes over (the transports
first send what they hold); a short connection (a TLS handshake and a page)
never pays for setting it up. Where the socket relay cannot take over (a side
already closed, no descriptors left for the duplicates), the transports go on.

Must not: parse or decide anything; it counts bytes (``bytes_in``) and nothing else.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Literal

READ_HIGH_WATER = 256 * 1024
"""Bytes buffered for a reading coroutine before the socket stops being read.
Bounds per-connection memory while a scan or an upstream connect is pending."""

PIPE_BYTES = 256 * 1024
"""Capacity of a relay pipe (``F_SETPIPE_SZ``): a bulk transfer needs a quarter
of the readiness callbacks and syscalls of the default 64 KiB. Pipe pages are
only taken while bytes are in flight. Capped by ``/proc/sys/fs/pipe-max-size``
(1 MiB by default); a smaller grant still works."""

RELAY_AFTER = 256 * 1024
"""Bytes a side receives on the transports' relay before the socket relay takes over.
Setting the socket relay up and down costs a connection two duplicate descriptors
and socket objects, four readiness registrations (three ``epoll_ctl`` and an
``ioctl`` each with uvloop) and the syscalls asking where the ends are, about 24
of the 69 syscalls of a TLS passthrough connection (a handshake and a 1 KB page,
benchmarks/bench_proxy.py). Starting on the transports, such a connection cost
the proxy 0.66-0.75 against 0.74-0.90 ms of CPU (medians of 5 and 6 rounds
alternating with the socket relay from the start). Past this a connection is a
transfer, where the socket relay moves bytes for less (no ``bytes`` object a
read; ``splice(2)`` between two other hosts)."""

_NEVER = 1 << 62
"""``Side.relay_after`` when no socket relay is to take over."""

SPLICE_AFTER = 256 * 1024
"""Bytes a spliced direction copies before it opens its pipe. A pipe costs two
descriptors and about 50 µs of CPU to open and close (TLS passthrough, two
pipes a connection opened at once: 0.77-0.92 against 0.68-0.79 ms a connection
copied, benchmarks/bench_proxy.py), and splicing saves about 0.12 ns a byte
over copying (benchmarks/bench_relay.py): break-even near 400 KB. Copying until
about then and only then buying the pipe (the ski-rental rule) costs at most
twice the better choice made in hindsight, and a short connection (a handshake
and a page) never opens one."""

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
        self.relay: SocketRelay | None = None
        """Set by the socket relay while it carries this socket's bytes."""
        self.joined: _Joined | None = None
        """Set by ``splice`` while the transports relay: how their relay ends."""
        self.relay_after = _NEVER
        """``bytes_in`` at which the socket relay is to take over from the transports."""
        self.on_lost: Callable[[], None] | None = None
        """Called once, at the end of ``connection_lost``: how a connection driven by
        callbacks learns that this socket closed (``closed`` is for coroutines: a
        future's done callback is another trip through the loop's queue)."""

        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._closed_fut: asyncio.Future[None] | None = None

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done once the socket is closed (``connection_lost``), for coroutines to await.
        Made on first use: a connection driven by callbacks never asks (``on_lost``
        tells it), and a future is ~1 µs to make, two a connection."""
        if self._closed_fut is None:
            self._closed_fut = _event_future(self.lost)
        return self._closed_fut

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None:
            if peer.transport is not None and not peer.lost:
                peer.transport.write(data)
            if self.bytes_in >= self.relay_after and self.joined is not None:
                self.joined.end(hand_over=True)
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
        if isinstance(exc, OSError):
            # A reset, or a write the peer refused (EPIPE): the socket relay's "a reset
            # or any socket error" (``SocketRelay.fail``), so that the transports' relay
            # of a short connection reports the same close reason.
            self.reset = True
        self.eof = self.lost = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        closed = self._closed_fut
        if closed is not None and not closed.done():
            closed.set_result(None)
        if self.joined is not None:
            self.joined.end(hand_over=False)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.close()
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost()

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

    async def wait_data(self, timeout: float | None = None) -> None:
        """Wait until ``buf`` holds bytes or the peer ended its side; TimeoutError when
        neither happened within ``timeout`` seconds.

        One timer handle rather than ``asyncio.timeout``: this runs for nearly every
        read of every proxied message, and the context manager's task bookkeeping
        costs ~5.5 µs a read on uvloop against ~1.9 µs for the timer (a few a
        request; none when the bytes are already here)."""
        if self.buf or self.eof:
            return
        loop = asyncio.get_running_loop()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._wake()

        timer = None if timeout is None else loop.call_later(timeout, expire)
        try:
            while not self.buf and not self.eof:
                if expired:
                    raise TimeoutError(f"no data within {timeout} s")
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            if timer is not None:
                timer.cancel()

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

    async def read(self, timeout: float | None = None) -> bytes:
        """Everything received so far (waiting for at least one byte, at most ``timeout``
        seconds: then TimeoutError); b"" at EOF."""
        if not self.buf:
            await self.wait_data(timeout)
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


def splice(a: Side, b: Side, mode: RelayMode = "auto", *, after: int | None = None) -> None:
    """Join two sides: from now on each one's bytes go to the other (``spliced`` runs it).

    Bytes already buffered for a reader are forwarded first, and an EOF already
    seen is passed on, so nothing read during sniffing is lost. The transports
    relay until a side has received ``after`` bytes; then the socket relay
    (spliced or copied as ``mode`` says) takes over when it can (module
    docstring). ``after`` defaults to ``RELAY_AFTER``; 0: the socket relay from the start.
    """
    if after is None:
        after = RELAY_AFTER
    if after <= 0 and _socket_relay(a, b, mode):
        return
    _join(a, b, mode, after if after > 0 else _NEVER)


def _join(a: Side, b: Side, mode: RelayMode, after: int) -> None:
    """Start the transports' relay; the socket relay is to take over at ``after`` bytes."""
    joined = _Joined(mode)
    a.joined = b.joined = joined
    a.relay_after = b.relay_after = after
    _transport_splice(a, b)
    if a.lost or b.lost:
        joined.end(hand_over=False)


def _socket_relay(a: Side, b: Side, mode: RelayMode) -> bool:
    """Start the socket relay between ``a`` and ``b``; False when it cannot take over."""
    if a.lost or b.lost:
        return False
    try:
        a.relay = b.relay = SocketRelay(a, b, mode)
    except OSError:
        return False  # out of descriptors for the duplicates: the transports can still relay
    return True


def _event_future(happened: bool) -> asyncio.Future[None]:
    """A future for something that happens once, made when first awaited: done already
    if it has ``happened`` (its owner sets it when it does)."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if happened:
        fut.set_result(None)
    return fut


class _Joined:
    """The transports' relay of two sides: over when a side is lost, or when one has
    received its ``relay_after`` bytes (``hand_over``: the socket relay is to take over)."""

    __slots__ = ("mode", "ended", "hand_over", "on_end", "_over")

    def __init__(self, mode: RelayMode) -> None:
        self.mode = mode
        self.ended = False
        self.hand_over = False
        self.on_end: Callable[[], None] | None = None
        """Called when it ends, from the callback that ended it (``Side.data_received`` or
        ``connection_lost``): the callback-driven connection's way, where a task awaits ``over``."""
        self._over: asyncio.Future[None] | None = None

    @property
    def over(self) -> asyncio.Future[None]:
        """Done once it ended, for a task to await; made on first use (as ``Side.closed``)."""
        if self._over is None:
            self._over = _event_future(self.ended)
        return self._over

    def end(self, *, hand_over: bool) -> None:
        if not self.ended:
            self.ended = True
            self.hand_over = hand_over
            if self._over is not None:
                self._over.set_result(None)
            if self.on_end is not None:
                self.on_end()


async def spliced(a: Side, b: Side) -> None:
    """Run the relay between ``a`` and ``b`` until it is over; both sockets are then closed."""
    joined = a.joined
    if joined is not None:
        await joined.over
        if joined.hand_over:
            _hand_over(a, b, joined.mode)
    relay = a.relay
    if relay is None:
        await _transports_closed(a, b)
        return
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


def _hand_over(a: Side, b: Side, mode: RelayMode) -> None:
    """Move a connection from the transports' relay to the socket relay, which sends
    what the transports still hold first (``spliced``); where it cannot take over,
    the transports relay on to the end."""
    a.joined = b.joined = None
    a.relay_after = b.relay_after = _NEVER
    a.peer = b.peer = None  # nothing is read before the relay pauses both transports
    if not _socket_relay(a, b, mode):
        _join(a, b, mode, _NEVER)


async def _transports_closed(a: Side, b: Side) -> None:
    """End the transports' relay once it is over: close both sides, and wait until
    both are closed (their ``connection_lost`` tells a reset from a close)."""
    if a.joined is not None:
        await a.joined.over
    a.joined = b.joined = None
    a.close()
    b.close()
    await a.closed
    await b.closed


async def _flushed(side: Side) -> None:
    """Wait until the transport has sent what it holds (a CONNECT's 200, a 101 head,
    what the transports' relay forwarded): the socket relay writes behind its back
    and must not overtake it."""
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


# -- the socket relay ------------------------------------------------------------------

RelayMode = Literal["auto", "splice", "copy"]
"""How the socket relay moves a connection's bytes (``http.relay`` in the config).

``splice``: socket → pipe → socket with ``splice(2)`` (after the first
``SPLICE_AFTER`` bytes of a direction, which are copied); the payload never
enters user space. ``copy``: ``recv_into`` one reused buffer, then ``write``.
``auto`` (the default): splice between two other hosts (a gateway's client and
server), copy when one end is a process on this host (``_on_this_host``: the
interception proxy's loopback listener; a client and an origin on the proxy's
machine, as in benchmarks/bench_proxy.py).

Why it depends on where the ends are: splicing saves the relay both copies
(0.13-0.21 against 0.23-0.35 CPU s/GB, benchmarks/bench_relay.py), but the
spliced pages are the sending socket's, and they stay referenced until the
final receiver has read them. A local sender then cannot reuse its warm pages
(it allocates and writes fresh ones), and a local receiver reads cold ones:
measured with perf on the TLS bulk run (benchmarks/bench_proxy.py), nginx paid
about 0.08 and curl 0.15 CPU s/GB more than behind the copying relay, more
than the relay saved: the machine spent 2.12-2.22 against 1.87-2.08 s/GB, and
the copying relay moved 7-16 % more (medians of alternating rounds). Ends
that do not touch the bytes hide this: in benchmarks/bench_relay.py (a sender
repeating one buffer, a receiver discarding) the sums come out about even. On
other hosts those costs are not this machine's, so there splice is the
cheaper relay."""

RELAY_MODES: tuple[RelayMode, ...] = ("auto", "splice", "copy")

_HAVE_SPLICE = hasattr(os, "splice")  # Linux, Python 3.10+
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

COPY_BYTES = 256 * 1024
"""Size of the copying relay's buffer, the most one ``recv_into`` takes: as much
as a pipe holds (``PIPE_BYTES``). Measured on the TLS bulk run: 16 KiB cost
0.59 CPU s/GB against 0.46 for 64 KiB and 256 KiB (a read then takes what
arrived, about 83 KB on average). One buffer per thread (``_copy_buffer``),
shared by all its flows, since a flow only uses it inside one callback; what
``dst`` did not take is kept per flow (``pending``, at most this much: the
same bound as a pipe's)."""

COPY_ROUNDS = SPLICE_ROUNDS
"""Buffer-fulls copied per readiness callback, for the reason of ``SPLICE_ROUNDS``."""

_thread = threading.local()


def _copy_buffer() -> memoryview:
    """This thread's copy buffer: flows of one event loop share it, loops in
    other threads (tests, embedding) must not, since ``recv_into`` drops the GIL."""
    buf: memoryview | None = getattr(_thread, "copy_buffer", None)
    if buf is None:
        buf = _thread.copy_buffer = memoryview(bytearray(COPY_BYTES))
    return buf


def _on_this_host(sock: socket.socket) -> bool:
    """The peer of ``sock`` is this host: a loopback address, or one of our own (a
    connection to a local address leaves from that same address, RFC 6724 rule 1).
    Two syscalls and string tests: this runs for every relayed connection."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return sock.family == socket.AF_UNIX
    try:
        local, peer = sock.getsockname()[0], sock.getpeername()[0]
    except OSError:
        return False
    return local == peer or _loopback(peer)


def _loopback(addr: str) -> bool:
    """127.0.0.0/8 (RFC 1122 3.2.1.3) or ::1 (RFC 4291 2.5.3), also IPv4-mapped."""
    return addr == "::1" or addr.removeprefix("::ffff:").startswith("127.")


def _use_splice(mode: RelayMode, end_on_this_host: bool) -> bool:
    """Whether a connection is spliced (``RelayMode``); else it is copied."""
    if not _HAVE_SPLICE or mode == "copy":
        return False
    return mode == "splice" or not end_on_this_host


class SocketRelay:
    """Both directions of a relayed connection, on duplicates of the sides' sockets.

    Each direction reads ``src`` only while it holds nothing for ``dst``, and
    writes only while it does, so at most a pipe or a buffer is in flight per
    direction: when ``dst`` is full, ``src`` stops being read until ``dst``
    drains (the same back-pressure the transports give).
    """

    def __init__(self, a: Side, b: Side, mode: RelayMode = "auto") -> None:
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        """Done when both directions ended (or one failed)."""
        self.dups: list[socket.socket] = []
        """Duplicates of the transports' sockets (the relay's own, closed by ``stop``)."""
        self.flows: list[_Flow] = []
        try:
            sa, sb = self._socket(a), self._socket(b)
            # Only "auto" asks where the ends are (four syscalls a connection).
            local = mode == "auto" and (_on_this_host(sa) or _on_this_host(sb))
            use_splice = _use_splice(mode, local)
            self.flows.append(self._flow(use_splice, a, b, sa, sb))
            self.flows.append(self._flow(use_splice, b, a, sb, sa))
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

    def _flow(self, use_splice: bool, side: Side, dst_side: Side, sock_in: socket.socket,
              sock_out: socket.socket) -> _Flow:
        flow = _SpliceFlow if use_splice else _CopyFlow
        return flow(self, side, dst_side, sock_in, sock_out, memoryview(bytes(side.buf)))

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
        """Unregister the flows, close the pipes and the duplicate descriptors (idempotent)."""
        for f in self.flows:
            f.close()
        self.flows = []
        for s in self.dups:
            s.close()
        self.dups = []


class _Flow:
    """One direction of a socket relay, ``src`` → ``dst``; subclasses move the bytes.

    ``readable`` runs while ``src`` is registered for reading (nothing held for
    ``dst``), ``flush`` while ``dst`` is registered for writing (something held).
    """

    __slots__ = ("relay", "side", "dst_side", "sock_out", "src", "dst", "pending", "eof", "done", "reading",
                 "writing")

    def __init__(self, relay: SocketRelay, side: Side, dst_side: Side, sock_in: socket.socket,
                 sock_out: socket.socket, pending: memoryview) -> None:
        self.relay = relay
        self.side = side
        """The sending side: counts what ``src`` received (``bytes_in``), marked on EOF."""
        self.dst_side = dst_side
        self.sock_out = sock_out
        self.src, self.dst = sock_in.fileno(), sock_out.fileno()
        self.pending = pending
        """Bytes for ``dst`` outside the kernel: read before the relay took over (the
        ClientHello), or the part of a copy ``dst`` did not take. Sent first."""
        self.eof = False
        self.done = False
        self.reading = self.writing = False

    def readable(self) -> None:
        raise NotImplementedError

    def _send(self) -> bool:
        """Write what this direction holds to ``dst``; False when ``dst`` is full."""
        while self.pending:
            try:
                self.pending = self.pending[os.write(self.dst, self.pending):]
            except BlockingIOError:
                return False
        return True

    def _sent(self) -> bool | None:
        """``_send``, with a failure of ``dst`` ending the relay (then None)."""
        try:
            return self._send()
        except OSError:
            self.relay.fail(self.dst_side)
            return None

    def _received(self, read: Callable[[Any], int], arg: Any) -> int:
        """One read of ``src`` (``read(arg)``): the bytes it took, counted; 0 when this
        callback is over: nothing there yet, the peer's FIN (passed on), or an error
        (the relay ends)."""
        try:
            n = read(arg)
        except BlockingIOError:
            return 0
        except OSError:
            self.relay.fail(self.side)
            return 0
        if n == 0:
            self._ended()
            return 0
        self.side.bytes_in += n
        return n

    def _ended(self) -> None:
        """``src`` sent its FIN: stop reading; ``flush`` passes it on once ``dst`` has all."""
        self.eof = self.side.eof = True
        self._read(False)
        self.flush()

    def flush(self) -> None:
        """``dst`` may take more: send what is held; then read again, or pass the EOF on."""
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

    def _held(self) -> None:
        """``dst`` is full: wait for it before reading ``src`` again (back-pressure)."""
        self._read(False)
        self._write(True)

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


class _CopyFlow(_Flow):
    """``src`` → this thread's buffer → ``dst``: two copies, no descriptors of its own."""

    __slots__ = ("recv_into", "buf")

    def __init__(self, relay: SocketRelay, side: Side, dst_side: Side, sock_in: socket.socket,
                 sock_out: socket.socket, pending: memoryview) -> None:
        super().__init__(relay, side, dst_side, sock_in, sock_out, pending)
        self.recv_into = sock_in.recv_into
        self.buf = _copy_buffer()

    def readable(self) -> None:
        """``src`` has bytes (or EOF): copy up to ``COPY_ROUNDS`` buffer-fulls to ``dst``."""
        buf = self.buf
        for _ in range(COPY_ROUNDS):
            n = self._received(self.recv_into, buf)
            if not n:
                return
            try:
                sent = os.write(self.dst, buf[:n])
            except BlockingIOError:
                sent = 0
            except OSError:
                self.relay.fail(self.dst_side)
                return
            if sent < n:
                # The buffer is the next read's (and other flows'): keep only the rest.
                self.pending = memoryview(bytes(buf[sent:n]))
                self._held()
                return
            if n < len(buf):
                return  # the socket is (nearly) empty: wait for the next readiness


class _SpliceFlow(_CopyFlow):
    """``src`` → a pipe → ``dst`` with ``splice(2)``: the payload stays in the kernel.

    The pipe is only opened once the flow has carried ``SPLICE_AFTER`` bytes;
    until then the flow copies (``_CopyFlow``), so a short connection never pays
    for one."""

    __slots__ = ("rfd", "wfd", "capacity", "may_pipe", "in_pipe")

    def __init__(self, relay: SocketRelay, side: Side, dst_side: Side, sock_in: socket.socket,
                 sock_out: socket.socket, pending: memoryview) -> None:
        super().__init__(relay, side, dst_side, sock_in, sock_out, pending)
        self.rfd = self.wfd = -1
        """The pipe's ends; -1 while the flow copies."""
        self.capacity = PIPE_DEFAULT_BYTES
        self.may_pipe = True
        self.in_pipe = 0

    def readable(self) -> None:
        """``src`` has bytes (or EOF): move up to ``SPLICE_ROUNDS`` pipe-fulls to ``dst``."""
        if self.rfd < 0:
            super().readable()
            # Only between two reads, with nothing held (still reading): pending
            # bytes always go out before the pipe's, so the order is kept anyway.
            if self.may_pipe and self.reading and self.side.bytes_in >= SPLICE_AFTER:
                self._open_pipe()
            return
        for _ in range(SPLICE_ROUNDS):
            n = self._received(self._splice_in, self.capacity)
            if not n:
                return
            self.in_pipe += n
            sent_all = self._sent()
            if sent_all is None:
                return
            if not sent_all:
                self._held()
                return
            if n < self.capacity:
                return  # the socket is (nearly) empty: wait for the next readiness

    def _splice_in(self, capacity: int) -> int:
        return os.splice(self.src, self.wfd, capacity, flags=_SPLICE_FLAGS)

    def _open_pipe(self) -> None:
        """A bulk transfer: from now on splice, through a pipe of ``PIPE_BYTES``."""
        self.may_pipe = False
        try:
            self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # no descriptors left: this flow keeps copying
        try:
            self.capacity = fcntl.fcntl(self.wfd, _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # refused (pipe-max-size, or the user's pipe quota): 64 KiB splices

    def _send(self) -> bool:
        """Write ``pending`` then the pipe to ``dst``; False when ``dst`` is full."""
        if not super()._send():
            return False
        while self.in_pipe:
            try:
                self.in_pipe -= os.splice(self.rfd, self.dst, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
        return True

    def close(self) -> None:
        super().close()
        if self.rfd >= 0:
            os.close(self.rfd)
            os.close(self.wfd)
            self.rfd = self.wfd = -1
