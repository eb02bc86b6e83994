"""Record builders shared by the two HTTP/TLS paths (fast path and mitmproxy addon).

Owns: connection ids, and turning what an adapter
saw (addresses, head fields, byte counts, the Engine's ``Verdict``) into
``storage.records`` ``Conn`` / ``Http`` / ``Tls`` records. Both paths call
these functions, so the same transaction gives the same record whichever path
carried it.

Must not: read the clock (``ts`` is the caller's argument, STYLE.md 2), decide
anything, or write to the store (the caller hands records to ``RecordWriter.submit``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from storage.communityid import community_id
from rules.verdict import Match, Verdict, combine_action
from storage.records import Conn, Http, Record, Tls

EVIDENCE_CHARS = 2048
"""Evidence kept on a block: the matched snippets, at most this many characters.
Enough for an auditor to read each match in its sentence; small enough that a
flood of blocks cannot fill the store."""

URL_CHARS = 4096
"""Longest URL recorded; longer ones are cut (browsers stop at about 2 MB, a log
line should not)."""

_UID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

Headers = Sequence[tuple[bytes, bytes]]
DnsNames = Callable[[str, str], str | None]
"""(client_ip, server_ip) → the name the client last resolved to server_ip."""


_UID_PAIRS = [lo + hi for hi in _UID_ALPHABET for lo in _UID_ALPHABET]
"""Two base62 digits at once, least significant first: ``_UID_PAIRS[hi * 62 + lo]``."""


UID_POOL_BYTES = 13 * 256
"""``os.urandom`` bytes drawn at once for connection ids: one ``getrandom`` call per
256 connections instead of one each."""

_uid_pool = memoryview(b"")
_uid_at = 0


def _reset_uid_pool() -> None:
    """A forked child must not hand out its parent's ids."""
    global _uid_pool, _uid_at
    _uid_pool, _uid_at = memoryview(b""), 0


os.register_at_fork(after_in_child=_reset_uid_pool)


def new_uid() -> str:
    """A connection id in Zeek's style: ``C`` + 17 base62 characters (~101 bits),
    least significant digit first.

    Runs once per connection: the bits are ``secrets.randbits(101)``'s (13 bytes
    of ``os.urandom``, shifted, taken from a pool: ``UID_POOL_BYTES``) without its
    Python-level call, and the digits go two at a time (8 pairs, then the top
    digit: 101 bits < 62**17), written out rather than looped (half the time)."""
    global _uid_pool, _uid_at
    at = _uid_at
    if at + 13 > len(_uid_pool):
        _uid_pool, at = memoryview(os.urandom(UID_POOL_BYTES)), 0
    _uid_at = at + 13
    n = int.from_bytes(_uid_pool[at : at + 13]) >> 3
    n, r0 = divmod(n, 3844)
    n, r1 = divmod(n, 3844)
    n, r2 = divmod(n, 3844)
    n, r3 = divmod(n, 3844)
    n, r4 = divmod(n, 3844)
    n, r5 = divmod(n, 3844)
    n, r6 = divmod(n, 3844)
    n, r7 = divmod(n, 3844)
    p = _UID_PAIRS
    return "".join(("C", p[r0], p[r1], p[r2], p[r3], p[r4], p[r5], p[r6], p[r7], _UID_ALPHABET[n]))


R = TypeVar("R", bound=Record)
_replace = msgspec.structs.replace
"""``msgspec.structs.replace``: a record with some fields changed (``ConnInfo.stamped``)."""


@dataclass(slots=True)
class ConnInfo:
    """What both paths know about one client connection; mutable while it lives."""

    uid: str
    ts: int
    """Accept time, µs UTC."""
    client_ip: str
    client_port: int
    server_ip: str | None = None
    server_port: int | None = None
    nat_ip: str | None = None
    nat_port: int | None = None
    account: str | None = None
    client_mac: str | None = None
    dns_name: str | None = None

    _cid: tuple[object, object, str | None] | None = None
    """Cache of (server_ip, server_port, community id): one hash per server, not per record."""

    def community_id(self) -> str | None:
        """The flow's Community ID (None until the server is known)."""
        cached = self._cid
        if cached is not None and cached[0] == self.server_ip and cached[1] == self.server_port:
            return cached[2]
        cid = None
        if self.server_ip and self.server_port:
            try:
                cid = community_id(6, self.client_ip, self.client_port, self.server_ip, self.server_port)
            except ValueError:
                cid = None  # mixed address families (v4 client, v6 server): no flow hash
        self._cid = (self.server_ip, self.server_port, cid)
        return cid

    def stamped(self, record: R) -> R:
        """``record`` with the fields every record of this connection carries.

        The record builders make their own fields with the constructor and take these
        from here: ``replace`` with the ten of them costs a fifth of what building them
        into a dict and passing it as ``**`` keywords did (the fast path makes two
        records for every TLS connection)."""
        return _replace(  # type: ignore[no-any-return]
            record,
            uid=self.uid,
            account=self.account,
            client_ip=self.client_ip,
            client_port=self.client_port,
            client_mac=self.client_mac,
            nat_ip=self.nat_ip,
            nat_port=self.nat_port,
            server_ip=self.server_ip,
            server_port=self.server_port,
            community_id=self.community_id(),
        )


def merge(verdicts: Sequence[Verdict | None]) -> Verdict:
    """One verdict for a transaction from its parts (request head/body, response)."""
    present = [v for v in verdicts if v is not None]
    if len(present) == 1:
        return present[0]
    if all(not v.matches and not v.errors and not v.truncated for v in present):
        return present[0]  # the common case: nothing to merge
    matches: list[Match] = []
    seen: set[str] = set()
    version = 0
    truncated = False
    errors: list[str] = []
    for v in verdicts:
        if v is None:
            continue
        version = v.ruleset_version or version
        truncated = truncated or v.truncated
        errors.extend(e for e in v.errors if e not in errors)
        for m in v.matches:
            if m.rule_id not in seen:
                seen.add(m.rule_id)
                matches.append(m)
    return Verdict(combine_action(matches), tuple(matches), version, truncated, tuple(errors))


def header(headers: Headers, name: bytes) -> str | None:
    """First value of header ``name`` (lower-case bytes), decoded latin-1."""
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def http_record(
    conn: ConnInfo,
    ts: int,
    *,
    method: str | None,
    url: str | None,
    host: str | None,
    req_headers: Headers,
    status: int | None,
    resp_headers: Headers = (),
    req_bytes: int = 0,
    resp_bytes: int = 0,
    verdict: Verdict,
    action: str | None = None,
) -> Http:
    """The http record of one transaction. ``action`` overrides the verdict's
    (a policy block past a cap, a malformed message)."""
    first = verdict.matches[0] if verdict.matches else None
    act = action or verdict.action
    return conn.stamped(Http(
        ts=ts,
        action=act,  # type: ignore[arg-type]
        rule_ids=list(verdict.rule_ids),
        ruleset_version=verdict.ruleset_version or None,
        method=method,
        host=host,
        url=url[:URL_CHARS] if url else url,
        status=status,
        content_type=header(resp_headers, b"content-type"),
        req_bytes=req_bytes,
        resp_bytes=resp_bytes,
        user_agent=header(req_headers, b"user-agent"),
        referrer=header(req_headers, b"referer"),
        category=first.category if first else None,
        keyword=first.pattern if first else None,
        snippet=first.snippet if first else None,
        evidence=evidence(verdict) if act == "block" else None,
    ))


def evidence(verdict: Verdict) -> str | None:
    """The matched snippets of a block, capped at ``EVIDENCE_CHARS``."""
    parts = [f"[{m.rule_id} {m.where}] {m.snippet}" for m in verdict.matches if m.snippet]
    if verdict.errors:
        parts.append("errors: " + "; ".join(verdict.errors))
    text = "\n".join(parts)
    return text[:EVIDENCE_CHARS] or None


def tls_record(
    conn: ConnInfo,
    ts: int,
    *,
    sni: str | None,
    alpn: Sequence[str],
    versions: Sequence[str],
    verdict: Verdict,
    intercepted: bool,
) -> Tls:
    return conn.stamped(Tls(
        ts=ts,
        action=verdict.action,
        rule_ids=[m.rule_id for m in verdict.matches],
        ruleset_version=verdict.ruleset_version or None,
        sni=sni,
        alpn=list(alpn),
        tls_version=highest_version(versions),
        intercepted=intercepted,
    ))


_VERSION_ORDER = ("SSLv3", "TLSv1", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_VERSION_RANK = {v: i for i, v in enumerate(_VERSION_ORDER)}


def highest_version(versions: Sequence[str]) -> str | None:
    if "TLSv1.3" in versions:
        return "TLSv1.3"  # the top rank, and what nearly every client offers now
    known = [v for v in versions if v in _VERSION_RANK]
    if known:
        return max(known, key=_VERSION_RANK.__getitem__)
    return versions[0] if versions else None


def conn_record(
    conn: ConnInfo,
    ts_end: int,
    *,
    service: str | None,
    bytes_up: int,
    bytes_down: int,
    close_reason: str,
    action: str = "allow",
    rule_ids: Sequence[str] = (),
    ruleset_version: int | None = None,
) -> Conn:
    return conn.stamped(Conn(
        ts=conn.ts,
        action=action,  # type: ignore[arg-type]
        rule_ids=list(rule_ids),
        ruleset_version=ruleset_version,
        proto="tcp",
        service=service,
        ts_end=ts_end,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        close_reason=close_reason,
        dns_name=conn.dns_name,
    ))
