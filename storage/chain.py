"""The integrity chain: per-day hash chain over committed batches, and the digest log.

Rules this module keeps:

1. Every committed batch ``n`` of a day file has ``hash_n = SHA-256("linewarden-batch-v1" ||
   hash_{n-1} || n || first_id || count || for each row: len || logical bytes)``, where
   the logical bytes are the msgpack of (kind, field values) in the file's own layout.
   ``hash_{-1}`` is SHA-256 of "linewarden-chain-v1" and the day, so a day file cannot be
   passed off as another day.
2. Chain heads are signed with the appliance's Ed25519 key into ``digests.log`` (one JSON
   object a line): periodically while the day is open, and finally at day close
   (``final``); retention appends an ``expired`` entry before it deletes a day.
3. Each digest entry carries the SHA-256 of the previous line, so removing a line from the
   middle of the log breaks the log; the log is what goes to the alarm centre.

Owns hashing and the digest log format. Must not decide what to sign or when (the writer
does) and must not open day files.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

from linewarden.keys import KeyPair, verify as verify_sig
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

try:
    from storage import _copies
except ImportError:  # built without a C compiler
    _copies = None
if os.environ.get("LINEWARDEN_PURE_PYTHON", "") not in ("", "0"):
    _copies = None

DIGEST_LOG = "digests.log"
GENESIS_PREFIX = b"linewarden-chain-v1\0"
BATCH_PREFIX = b"linewarden-batch-v1\0"
_LEN = struct.Struct(">I").pack


def genesis(day: str) -> bytes:
    return hashlib.sha256(GENESIS_PREFIX + day.encode()).digest()


def batch_hash(prev: bytes, n: int, first_id: int, logical_rows: Iterable[bytes]) -> tuple[bytes, int]:
    """(hash of the batch, number of rows) per rule 1."""
    rows = list(logical_rows) if not isinstance(logical_rows, list) else logical_rows
    return batch_hash_framed(prev, n, first_id, [frame(rows)], len(rows)), len(rows)


def batch_hash_framed(prev: bytes, n: int, first_id: int, framed: list[bytes], count: int) -> bytes:
    """The hash of a batch of ``count`` rows given framed (``frame``), in pieces."""
    h = hashlib.sha256(BATCH_PREFIX + prev + struct.pack(">QQI", n, first_id, count))
    for piece in framed:
        h.update(piece)
    return h.digest()


def frame(rows: list[bytes]) -> bytes:
    """Each row after its length (4 bytes, big-endian), concatenated; in C where
    ``storage._copies`` is built (this runs for every record the store takes)."""
    if _copies is not None:
        try:
            return _copies.frame(rows)
        except TypeError:  # a row that is not bytes (a bytearray...): the general join
            pass
    return b"".join([x for b in rows for x in (_LEN(len(b)), b)])


class DigestEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``digests.log``."""

    seq: int
    """Line number, from 0."""
    prev: str
    """SHA-256 (hex) of the previous line's bytes; "" for the first line."""
    event: str
    """``checkpoint`` (open day), ``close`` (final head of a day) or ``expired`` (retention)."""
    day: str
    """The day (YYYY-MM-DD in the store's time zone)."""
    batch: int
    """Number of the last batch covered (-1: the day had none)."""
    last_id: int
    """Row id of the last row covered."""
    head: str
    """Chain hash (hex) after that batch."""
    at: int
    """When it was signed, µs since the epoch, UTC."""
    key: str
    """Fingerprint of the signing key."""
    sig: str = ""
    """Ed25519 signature (base64) of this entry encoded with ``sig`` empty."""

    @property
    def final(self) -> bool:
        return self.event == "close"


def _signed_bytes(e: DigestEntry) -> bytes:
    return msgspec.json.encode(msgspec.structs.replace(e, sig=""))


class DigestLog:
    """Append-only, signed, line-chained log of chain heads (rules 2 and 3)."""

    def __init__(self, store_dir: str | os.PathLike[str]) -> None:
        self.path = Path(store_dir) / DIGEST_LOG
        self.seq, self.prev = 0, ""
        last = self._last_line()
        if last is not None:
            e = msgspec.json.decode(last, type=DigestEntry)
            self.seq, self.prev = e.seq + 1, hashlib.sha256(last).hexdigest()

    def _last_line(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                if size == 0:
                    return None
                back = min(size, 65536)
                f.seek(size - back)
                tail = f.read()
        except FileNotFoundError:
            return None
        lines = [ln for ln in tail.split(b"\n") if ln.strip()]
        return lines[-1] if lines else None

    def append(self, key: KeyPair, *, event: str, day: str, batch: int, last_id: int, head: bytes, at: int) -> DigestEntry:
        e = DigestEntry(
            seq=self.seq, prev=self.prev, event=event, day=day, batch=batch, last_id=last_id,
            head=head.hex(), at=at, key=key.fingerprint,
        )
        e = msgspec.structs.replace(e, sig=key.sign(_signed_bytes(e)))
        line = msgspec.json.encode(e)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.seq, self.prev = self.seq + 1, hashlib.sha256(line).hexdigest()
        return e


def read_digests(path: str | os.PathLike[str], public: Ed25519PublicKey | None) -> Iterator[tuple[int, DigestEntry | None, str | None]]:
    """(line number, entry or None, problem or None) for each line, checking the line chain
    and, when ``public`` is given, each signature."""
    prev = ""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip(b"\n")
            if not line.strip():
                continue
            try:
                e = msgspec.json.decode(line, type=DigestEntry)
            except msgspec.DecodeError as exc:
                yield lineno, None, f"digest log line {lineno} is not a digest entry ({exc})"
                prev = hashlib.sha256(line).hexdigest()
                continue
            problem = None
            if e.prev != prev:
                problem = f"digest log line {lineno} (seq {e.seq}): previous-line hash does not match (a line was removed or changed)"
            elif public is not None and not verify_sig(public, e.sig, _signed_bytes(e)):
                problem = f"digest log line {lineno} (seq {e.seq}, day {e.day}): bad signature"
            prev = hashlib.sha256(line).hexdigest()
            yield lineno, e, problem
