"""``linewarden export``: hand records to an investigator (JSON lines or CSV) or to a SIEM
as RFC 5424 syslog over UDP (RFC 5426) or TCP (RFC 6587 octet counting).

The record in a syslog message is the same JSON form as ``query --json`` (storage/query.py),
after a UTF-8 BOM as RFC 5424 section 6.4 asks for a UTF-8 MSG. Forwarding is best effort:
the store stays the record of truth, a SIEM that is down costs counted failures, not records.

Must not write to the store.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from storage.query import to_json, write_csv
from storage.records import Record

FACILITY_LOCAL0 = 16
"""RFC 5424 facility local use 0: the usual choice for an appliance's own audit stream."""
SEVERITY = {"alarm": 1, "block": 4, "default": 6}
"""alert for alarms, warning for blocked traffic, informational otherwise (RFC 5424 table 2)."""
UDP_MAX = 65000
"""Largest datagram we send (IPv4 UDP payload limit is 65507); longer messages are cut."""
DEFAULT_PORTS = {"udp": 514, "tcp": 601}
BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    proto: str
    host: str
    port: int


def parse_syslog_target(text: str) -> SyslogTarget:
    """``udp://host[:port]`` or ``tcp://host[:port]`` (ports default to 514 and 601)."""
    u = urlsplit(text)
    if u.scheme not in DEFAULT_PORTS or not u.hostname:
        raise ValueError("expected udp://HOST[:PORT] or tcp://HOST[:PORT]")
    try:
        port = u.port or DEFAULT_PORTS[u.scheme]
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    return SyslogTarget(u.scheme, u.hostname, port)


def rfc5424(record: Record, *, hostname: str, app: str = "linewarden", procid: str = "-") -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOST APP PROCID MSGID - BOM JSON``."""
    tag = record.__struct_config__.tag  # type: ignore[attr-defined]
    sev = SEVERITY["alarm"] if tag == "alarm" else SEVERITY["block"] if record.action == "block" else SEVERITY["default"]
    ts = dt.datetime.fromtimestamp(record.ts / 1e6, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
    head = f"<{FACILITY_LOCAL0 * 8 + sev}>1 {ts} {host} {app} {procid} {tag[:32]} - "
    return head.encode() + (BOM.encode() + to_json(record))


class SyslogSender:
    """Sends records to one syslog collector; counts what it could not deliver."""

    def __init__(self, target: str | SyslogTarget, *, timeout: float = 2.0) -> None:
        self.target = parse_syslog_target(target) if isinstance(target, str) else target
        self.timeout = timeout
        self.hostname = socket.gethostname()
        self.procid = str(os.getpid())
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            t = self.target
            kind = socket.SOCK_DGRAM if t.proto == "udp" else socket.SOCK_STREAM
            s = socket.create_connection((t.host, t.port), self.timeout) if kind == socket.SOCK_STREAM else socket.socket(
                socket.AF_INET6 if ":" in t.host else socket.AF_INET, socket.SOCK_DGRAM)
            if kind == socket.SOCK_DGRAM:
                s.connect((t.host, t.port))
            self._sock = s
        return self._sock

    def send_many(self, records: Iterable[Record]) -> int:
        n = 0
        for r in records:
            if self.send(r):
                n += 1
        return n

    def send(self, record: Record) -> bool:
        msg = rfc5424(record, hostname=self.hostname, procid=self.procid)
        try:
            s = self._connect()
            if self.target.proto == "udp":
                s.send(msg[:UDP_MAX])
            else:
                s.sendall(f"{len(msg)} ".encode() + msg)  # RFC 6587 3.4.1 octet counting
        except OSError:
            self.failed += 1
            self.close()
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


def export(records: Iterable[Record], out: TextIO, fmt: str = "jsonl") -> int:
    """Write ``records`` to ``out`` as ``jsonl`` (the documented JSON form, one a line) or
    ``csv`` (a header of every field of every kind); the count."""
    if fmt == "csv":
        return write_csv(records, out)
    if fmt != "jsonl":
        raise ValueError(f"format {fmt!r}: jsonl or csv")
    n = 0
    for r in records:
        out.write(to_json(r).decode())
        out.write("\n")
        n += 1
    return n
