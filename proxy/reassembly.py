"""TCP stream reassembly for the replay: segments in capture order → each direction's bytes in order.

Owns: one direction of one TCP connection (``HalfStream``): sequence numbers made
relative to the initial sequence number and unwrapped past 2^32 (RFC 9293 §3.4:
sequence space is modulo 2^32), out-of-order segments held until the hole before
them fills, exact and overlapping retransmissions trimmed, FIN and RST ending the
stream, and holes that never fill reported as ``Gap`` so the stream goes on after
them. Memory is bounded per direction (``ReassemblyLimits``).
Must not: know which side is the client, parse what the bytes mean, or keep a
table of connections (proxy/replay.py does both).

Rules:
1. Bytes once delivered are final. A retransmission that overlaps delivered bytes
   only contributes what lies beyond them (first copy wins, as Linux' receiver
   keeps it); the overlap is counted in ``stats.overlap_bytes``.
2. Among buffered out-of-order segments the one that starts first wins an
   overlap (earliest arrival breaks ties).
3. A hole is given up on, and reported as ``Gap(length)``, only when the buffered
   data behind it passes a limit, or when the caller calls ``flush`` (connection
   end, idle timeout, end of capture). Never silently.
4. Data after the FIN's sequence number is ignored (RFC 9293 §3.10.7.4: the FIN
   is the last byte of the stream).
"""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass

SEQ_MOD = 1 << 32
MASK = SEQ_MOD - 1
HALF = 1 << 31


@dataclass(frozen=True, slots=True)
class Gap:
    """Bytes of the stream that were never captured; the stream continues after them."""

    length: int
    """How many bytes are missing (known from the sequence numbers)."""


@dataclass(frozen=True, slots=True)
class ReassemblyLimits:
    """Per-direction bounds on what reassembly buffers."""

    max_pending_bytes: int = 4 << 20
    """Out-of-order bytes buffered behind a hole before the hole is given up on.
    4 MiB is above the largest receive window Linux advertises by default
    (net.ipv4.tcp_rmem max 6 MiB, of which tcp_adv_win_scale leaves ~3 MiB), so
    a real sender cannot have more in flight; Suricata's default reassembly depth is 1 MiB."""
    max_pending_segments: int = 8192
    """Out-of-order segments buffered behind a hole. Bounds the per-segment
    overhead that many tiny (one-byte) segments would otherwise cost."""


@dataclass(slots=True)
class HalfStreamStats:
    delivered: int = 0
    """Bytes delivered in order."""
    segments: int = 0
    """Segments with payload."""
    out_of_order: int = 0
    """Segments that arrived ahead of a hole and were buffered."""
    retransmitted_bytes: int = 0
    """Payload bytes already delivered or buffered (exact retransmissions)."""
    overlap_bytes: int = 0
    """Bytes of partially overlapping segments that were trimmed."""
    gaps: int = 0
    """Holes given up on."""
    gap_bytes: int = 0
    """Bytes in those holes."""
    after_fin: int = 0
    """Payload bytes past the FIN, ignored."""


class HalfStream:
    """One direction of a TCP connection.

    ``segment()`` returns what became deliverable: a list of ``bytes`` and ``Gap``
    in stream order. ``finished`` turns True when every byte up to the FIN was
    delivered, or after ``reset()``.
    """

    __slots__ = ("limits", "base", "next", "pending", "pending_bytes", "fin_at", "finished", "stats", "midstream", "_tie")

    def __init__(self, limits: ReassemblyLimits | None = None) -> None:
        self.limits = limits or ReassemblyLimits()
        self.base: int | None = None
        """Sequence number of stream offset 0 (ISN + 1), when known."""
        self.next = 0
        """Stream offset of the next byte to deliver (unwrapped: may pass 2^32)."""
        self.pending: list[tuple[int, int, bytes]] = []
        """Buffered segments as (start offset, arrival number, data), sorted."""
        self.pending_bytes = 0
        self.fin_at: int | None = None
        self.finished = False
        self.midstream = False
        """True when the stream was picked up without its SYN."""
        self.stats = HalfStreamStats()
        self._tie = 0

    def syn(self, seq: int) -> None:
        """The SYN (or SYN-ACK) of this direction: data starts at ``seq + 1``."""
        if self.base is None:
            self.base = (seq + 1) % SEQ_MOD

    def _offset(self, seq: int) -> int:
        rel = (seq - self.base) % SEQ_MOD  # type: ignore[operator]
        cand = (self.next & ~(SEQ_MOD - 1)) | rel
        if cand - self.next > HALF:
            cand -= SEQ_MOD
        elif self.next - cand > HALF:
            cand += SEQ_MOD
        return cand

    def segment(self, seq: int, data: bytes, fin: bool = False) -> list[bytes | Gap]:
        """One segment of this direction (``seq`` as on the wire)."""
        base = self.base
        if (base is not None and data and not fin and not self.pending and self.fin_at is None
                and seq == (base + self.next) & MASK and not self.finished):
            # The common case, short-cut: the next bytes in order, nothing buffered,
            # no FIN known (so no byte can lie past it). What the general path below
            # does for it, without its calls.
            n = len(data)
            self.next += n
            st = self.stats
            st.segments += 1
            st.delivered += n
            return [data]
        if self.finished:
            if data:
                self.stats.after_fin += len(data)
            return []
        if self.base is None:
            if not data and not fin:
                return []
            # Picked up mid-stream: the first segment seen defines offset 0.
            self.base = seq
            self.midstream = True
        start = self._offset(seq)
        end = start + len(data)
        if fin and self.fin_at is None:
            self.fin_at = end
        out: list[bytes | Gap] = []
        if data:
            self.stats.segments += 1
            nxt = self.next
            if start == nxt and not self.pending:
                # The common case: in order, nothing buffered.
                self._deliver(data, end, out)
            elif end <= nxt:
                self.stats.retransmitted_bytes += len(data)
            elif start <= nxt:
                self.stats.overlap_bytes += nxt - start
                self._deliver(data[nxt - start :], end, out)
                self._drain(out)
            else:
                self._buffer(start, data, out)
        self._check_fin()
        return out

    def _deliver(self, data: bytes, end: int, out: list[bytes | Gap]) -> None:
        if self.fin_at is not None and end > self.fin_at:
            cut = end - self.fin_at
            self.stats.after_fin += cut
            data = data[: len(data) - cut]
            end = self.fin_at
        if data:
            out.append(data)
            self.stats.delivered += len(data)
        self.next = end

    def _buffer(self, start: int, data: bytes, out: list[bytes | Gap]) -> None:
        for s, _, d in self.pending:
            if s == start and len(d) == len(data):
                self.stats.retransmitted_bytes += len(data)
                return
        self.stats.out_of_order += 1
        self._tie += 1
        insort(self.pending, (start, self._tie, data))
        self.pending_bytes += len(data)
        lim = self.limits
        while self.pending and (
            self.pending_bytes > lim.max_pending_bytes or len(self.pending) > lim.max_pending_segments
        ):
            self._skip_hole(out)

    def _drain(self, out: list[bytes | Gap]) -> None:
        pending = self.pending
        while pending and pending[0][0] <= self.next:
            start, _, data = pending.pop(0)
            self.pending_bytes -= len(data)
            end = start + len(data)
            if end <= self.next:
                self.stats.retransmitted_bytes += len(data)
                continue
            if start < self.next:
                self.stats.overlap_bytes += self.next - start
                data = data[self.next - start :]
            self._deliver(data, end, out)

    def _skip_hole(self, out: list[bytes | Gap]) -> None:
        """Give up on the hole before the first buffered segment (rule 3)."""
        hole = self.pending[0][0] - self.next
        if hole > 0:
            out.append(Gap(hole))
            self.stats.gaps += 1
            self.stats.gap_bytes += hole
            self.next = self.pending[0][0]
        self._drain(out)

    def _check_fin(self) -> None:
        if self.fin_at is not None and self.next >= self.fin_at:
            self.finished = True
            self.stats.after_fin += self.pending_bytes
            self.pending.clear()
            self.pending_bytes = 0

    def flush(self) -> list[bytes | Gap]:
        """Deliver everything buffered, reporting each hole as a ``Gap``
        (connection end, idle timeout, end of capture). A hole before the FIN
        is reported too."""
        out: list[bytes | Gap] = []
        while self.pending:
            self._skip_hole(out)
            self._check_fin()
        if not self.finished and self.fin_at is not None and self.fin_at > self.next:
            hole = self.fin_at - self.next
            out.append(Gap(hole))
            self.stats.gaps += 1
            self.stats.gap_bytes += hole
            self.next = self.fin_at
            self._check_fin()
        return out

    def reset(self) -> list[bytes | Gap]:
        """An RST: deliver what is buffered (with its holes) and end the stream."""
        out = self.flush()
        self.finished = True
        return out
