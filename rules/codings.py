"""Content-Encoding: undo gzip, deflate (zlib-wrapped or raw), br, zstd and identity,
stacked, incrementally and with bounded output.

Owns: parsing the Content-Encoding list, one decompressor per layer, the output cap that
defuses decompression bombs, and best-effort recovery from damaged streams (what was
decoded before the damage is kept; the error is recorded as a string).

Must not: raise on bad input (every failure becomes an entry of ``errors``), buffer more
than a small probe of input, or know about charsets and containers.

Strategy. RFC 9110 8.4: "If one or more encodings have been applied to a representation,
the sender that applied the encodings MUST generate a Content-Encoding header field that
lists the content codings in the order in which they were applied", so layers are undone
right to left. Every decompressor is asked for at most ``PIECE_BYTES`` of output per call
and the chain is pulled piece by piece, so a layer never produces more than the next one
(and, at the end, the cap) lets through: a 1 GiB bomb costs at most ``max_output`` bytes
of work per layer and ``PIECE_BYTES`` of memory per layer.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import brotli

try:  # zstd ships with Python 3.14; before that mitmproxy depends on backports.zstd.
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from backports import zstd as _zstd  # type: ignore[import-not-found,no-redef]
    except ImportError:
        _zstd = None

PIECE_BYTES = 64 * 1024
"""Most output asked of a decompressor per call: bounds the memory of one step."""

PROBE_BYTES = 4096
"""Input kept by a layer until it first produces output, so that a body mislabelled as
compressed (``Content-Encoding: gzip`` on plain HTML) can be scanned as identity instead.
Headers of gzip/zlib/brotli streams are far shorter than this."""

SALVAGE_SLICE = 4096
"""Input slice used to re-decode a failed zlib call (then byte by byte inside the failing
slice): bounds the extra work of salvaging to one copy of zlib's state per slice."""

BROTLI_SLICE = 4096
"""Input given to brotli per call: brotli cannot be copied, so this bounds the input
whose output a corrupt stream can take with it."""

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
"""Default cap on decoded bytes (see ``rules.decode.DecodeLimits``)."""

SUPPORTED = frozenset({"gzip", "x-gzip", "deflate", "br", "identity"} |
                      ({"zstd"} if _zstd is not None else set()))


class _LayerError(Exception):
    """Internal: a layer's stream is damaged; the message says how."""


class _Layer:
    """One content coding; ``feed`` yields output pieces of at most about PIECE_BYTES."""

    name = "identity"

    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def finish(self) -> Iterator[bytes]:
        return iter(())


class _ZlibLayer(_Layer):
    """gzip (RFC 1952) or deflate: zlib-wrapped (RFC 1950) or raw (RFC 1951), detected."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._obj: zlib._Decompress | None = None
        self._start = b""  # the first bytes, until the deflate wrapper can be told
        self._after = bytearray()  # bytes after a member's end, until 2 tell what follows

    def _open(self, first: bytes) -> zlib._Decompress:
        if self.name == "deflate":
            # RFC 1950 2.2: CM = 8 in the low nibble of CMF, and CMF*256 + FLG is a multiple
            # of 31. Browsers accept raw deflate too, since servers send it as "deflate".
            wrapped = first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
            return zlib.decompressobj(15 if wrapped else -15)
        return zlib.decompressobj(31)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._obj is None:
            self._start += data
            if len(self._start) < 2:
                return
            self._obj, data = self._open(self._start), self._start
        yield from self._pull(data)

    def _pull(self, data: bytes) -> Iterator[bytes]:
        while data:
            obj = self._obj
            assert obj is not None
            if obj.eof:
                data = self._next_member(data)
                continue
            before = obj.copy()  # zlib drops a failing call's output: keep a way back
            try:
                out = obj.decompress(data, PIECE_BYTES)
            except zlib.error as exc:
                yield from self._salvage(before, data, SALVAGE_SLICE)
                raise _LayerError(str(exc)) from None
            data = obj.unused_data if obj.eof else obj.unconsumed_tail
            if out:
                yield out

    def _salvage(self, obj: zlib._Decompress, data: bytes, size: int) -> Iterator[bytes]:
        """Re-run a failed call in slices, the failing slice byte by byte, to keep all the
        output that precedes the damage (a bad CRC comes after all the text)."""
        for start in range(0, len(data), size):
            before = obj.copy() if size > 1 else obj
            piece, given = data[start:start + size], 0
            try:
                while piece and not obj.eof:
                    out = obj.decompress(piece, PIECE_BYTES)
                    piece = obj.unconsumed_tail
                    given += len(out)
                    if out:
                        yield out
            except zlib.error:
                if size > 1:
                    yield from self._skip(self._salvage(before, data[start:start + size], 1), given)
                return

    @staticmethod
    def _skip(pieces: Iterator[bytes], count: int) -> Iterator[bytes]:
        """``pieces`` without their first ``count`` bytes (already given out)."""
        for piece in pieces:
            if count >= len(piece):
                count -= len(piece)
                continue
            yield piece[count:]
            count = 0

    def _next_member(self, data: bytes) -> bytes:
        # RFC 1952 2.2: "A gzip file consists of a series of members".
        self._after += data
        if len(self._after) < 2:
            return b""
        rest, self._after = bytes(self._after), bytearray()
        if self.name == "deflate" or not rest.startswith(b"\x1f\x8b"):
            raise _LayerError(f"{len(rest)} bytes after the end of the stream")
        self._obj = zlib.decompressobj(31)
        return rest

    def finish(self) -> Iterator[bytes]:
        if self._obj is None:
            if self._start:
                raise _LayerError("stream truncated")
            return
        out = self._obj.flush(PIECE_BYTES)
        if out:
            yield out
        if not self._obj.eof:
            raise _LayerError("stream truncated")
        if self._after:
            raise _LayerError(f"{len(self._after)} bytes after the end of the stream")


class _BrotliLayer(_Layer):
    """br (RFC 7932), asked for bounded output as the brotli 1.1+ API allows."""

    name = "br"

    def __init__(self) -> None:
        self._obj = brotli.Decompressor()
        self._fed = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        for start in range(0, len(data), BROTLI_SLICE):
            if self._obj.is_finished():
                raise _LayerError(f"{len(data) - start} bytes after the end of the stream")
            piece = data[start:start + BROTLI_SLICE]
            try:
                yield from self._process(self._obj, piece)
            except brotli.error as exc:
                if self._fed == 0:  # a fresh decoder can be replayed: keep what precedes
                    yield from self._salvage(piece)
                raise _LayerError(str(exc) or "corrupt stream") from None
            self._fed += len(piece)

    @staticmethod
    def _process(obj: brotli.Decompressor, data: bytes) -> Iterator[bytes]:
        out = obj.process(data, output_buffer_limit=PIECE_BYTES)
        while True:
            if out:
                yield out
            # brotli: "Following process() must only be called with empty input until
            # can_accept_more_data() once returns True".
            if obj.can_accept_more_data():
                return
            out = obj.process(b"", output_buffer_limit=PIECE_BYTES)
            if not out and not obj.can_accept_more_data():
                raise _LayerError("decoder made no progress")  # never loop forever

    def _salvage(self, data: bytes) -> Iterator[bytes]:
        """Replay the first slice byte by byte to keep the output before the damage."""
        obj = brotli.Decompressor()
        try:
            for index in range(len(data)):
                if obj.is_finished():
                    raise _LayerError(f"{len(data) - index} bytes after the end of the stream")
                yield from self._process(obj, data[index:index + 1])
        except brotli.error:
            return

    def finish(self) -> Iterator[bytes]:
        if not self._obj.is_finished():
            raise _LayerError("stream truncated")
        return iter(())


class _ZstdLayer(_Layer):
    """zstd (RFC 8878), bounded with max_length like zlib."""

    name = "zstd"

    def __init__(self) -> None:
        self._obj = _zstd.ZstdDecompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while data or not (self._obj.needs_input or self._obj.eof):
                if self._obj.eof:
                    raise _LayerError(f"{len(data)} bytes after the end of the stream")
                out = self._obj.decompress(data, PIECE_BYTES)
                data = b""
                if out:
                    yield out
        except _zstd.ZstdError as exc:
            raise _LayerError(str(exc)) from None

    def finish(self) -> Iterator[bytes]:
        if not self._obj.eof:
            raise _LayerError("stream truncated")
        return iter(())


def _make_layer(name: str) -> _Layer:
    if name in ("gzip", "x-gzip"):
        return _ZlibLayer("gzip")
    if name == "deflate":
        return _ZlibLayer("deflate")
    if name == "br":
        return _BrotliLayer()
    if name == "zstd" and _zstd is not None:
        return _ZstdLayer()
    return _Layer()


def parse_codings(value: bytes | str | None) -> list[str]:
    """Content-Encoding header value -> coding names in the order they were applied."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return [token.strip().lower() for token in value.split(",") if token.strip()]


class _Slot:
    """A layer with its bookkeeping: output count, probe buffer, failure state."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.layer = _make_layer(name)
        self.produced = 0
        self.probe = bytearray()
        """All input so far while the layer has produced no output (at most PROBE_BYTES)."""
        self.state = "probing"  # -> "decoding" | "identity" (fallback) | "dead"


class ContentDecoder:
    """Undo a list of content codings incrementally, with at most ``max_output`` bytes out.

    ``feed``/``finish`` return decoded bytes and never raise. ``truncated`` is True when
    the cap stopped decoding; ``errors`` lists damage found (decoded text before the damage
    is still returned). Unknown codings are recorded and passed through as identity, and a
    layer that fails before producing any output falls back to identity for its input
    (a mislabelled body is scanned rather than dropped).
    """

    def __init__(self, codings: list[str], *, max_output: int = DEFAULT_MAX_OUTPUT) -> None:
        self.max_output = max_output
        self.truncated = False
        self.errors: list[str] = []
        for name in codings:
            if name not in SUPPORTED:
                self.errors.append(f"unknown content-coding {name!r}: scanned as identity")
        # Applied left to right, so undone right to left: the first slot undoes the last.
        self._slots = [_Slot(n) for n in reversed(codings) if n != "identity"]
        self._produced = 0
        self._stopped = False

    def feed(self, data: bytes) -> bytes:
        if not self._slots:  # identity, the commonest body: only the cap applies
            if self._stopped:
                return b""
            room = self.max_output - self._produced
            if len(data) > room:
                data = data[:room]
                self.truncated = self._stopped = True
            self._produced += len(data)
            return data
        out: list[bytes] = []
        if data and not self._stopped:
            self._push(0, data, out, final=False)
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        for index in range(len(self._slots)):
            if self._stopped:
                break
            self._push(index, b"", out, final=True)
        self._stopped = True
        return b"".join(out)

    def _push(self, index: int, data: bytes, out: list[bytes], *, final: bool) -> None:
        if index == len(self._slots):
            self._emit(data, out)
            return
        slot = self._slots[index]
        for piece in self._run(slot, data, final):
            if slot.produced >= self.max_output:
                # An inner layer may shrink its input again; bound the work of each layer.
                self.truncated = self._stopped = True
                return
            slot.produced += len(piece)
            self._push(index + 1, piece, out, final=False)
            if self._stopped:
                return

    def _emit(self, data: bytes, out: list[bytes]) -> None:
        room = self.max_output - self._produced
        if len(data) > room:
            data = data[:room]
            self.truncated = self._stopped = True
        self._produced += len(data)
        if data:
            out.append(data)

    def _run(self, slot: _Slot, data: bytes, final: bool) -> Iterator[bytes]:
        if slot.state == "dead":
            return
        if slot.state == "identity":
            if data:
                yield data
            return
        try:
            for piece in (slot.layer.finish() if final else slot.layer.feed(data)):
                slot.state = "decoding"
                yield piece
        except _LayerError as exc:
            yield from self._fail(slot, data, str(exc))
            return
        if slot.state == "probing":
            slot.probe += data
            if len(slot.probe) > PROBE_BYTES:
                slot.state = "decoding"  # too much input without output to fall back
                slot.probe.clear()

    def _fail(self, slot: _Slot, data: bytes, reason: str) -> Iterator[bytes]:
        if slot.state == "probing" and reason != "stream truncated":
            self.errors.append(f"{slot.name}: {reason} before any output: scanned as identity")
            slot.state = "identity"
            yield bytes(slot.probe) + data
            slot.probe.clear()
            return
        self.errors.append(f"{slot.name}: {reason}")
        slot.state = "dead"
