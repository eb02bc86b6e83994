"""The C passthrough on a fast path's listener: what it did, turned into records.

Owns: the ``proxy._passthrough.Passthrough`` of one ``FastPath`` (proxy/_passthrough.c
says what it carries and why), what it is told (the CONNECT heads and server
names this path decided: ``remember_head``, ``remember_sni``; ``forget`` on
another Engine), and its events: a connection handed over goes on in
``_AcceptedSide`` from where C stopped (``Resume``); a connection C carried gets
its tls and conn records from the same ``FastPath`` methods the Python path
uses (``tls_record``, ``connect_failed``, ``finish``), so both paths write the
same records for the same bytes.

Must not: decide (the verdicts are the Engine's, remembered per name), or write SQL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from proxy import _passthrough as native
from proxy.fastpath import FIRST_BYTES_TIMEOUT, ConnState, Resume, TlsDecision, _AcceptedSide, _Connect
from proxy.relay import PIPE_BYTES, SPLICE_AFTER
from proxy.tlshello import ClientHello, NeedMoreData, parse_client_hello
from rules.errors import InputError
from rules.verdict import Verdict

if TYPE_CHECKING:
    from proxy.fastpath import FastPath

log = logging.getLogger(__name__)

RELAY_MODES = {"auto": 0, "splice": 1, "copy": 2}
"""``FastPathConfig.relay`` as the C side numbers it."""

VERDICTS_MAX = 4096
"""Verdicts kept for the ids the C side was given (``fastpath.SNI_MEMO_MAX``): its own
memo is cleared when full too, and an id missing here is asked of the Engine again."""

_REASONS = {native.FIN: "fin", native.RST: "rst", native.TIMEOUT: "timeout", native.SHUTDOWN: "shutdown",
            native.BLOCK_REASON: "blocked"}

# The event tuple's fields (proxy/_passthrough.c, event_tuple).
(E_TYPE, E_CID, E_FD, E_STAGE, E_REASON, E_ERR, E_TS, E_TS2, E_PEER, E_DST, E_NAT, E_DATA, E_HEAD, E_UP, E_DOWN,
 E_VID, E_TLS, E_END) = range(18)
"""E_TS: accept, E_TS2: the decision (the tls record's ts), E_END: the end (µs UTC)."""


class NativePassthrough:
    """``start`` / ``stop`` with the fast path; events arrive on the loop (``_events``)."""

    def __init__(self, fp: FastPath, sock: socket.socket) -> None:
        cfg = fp.config
        self._fp = fp
        self._sock = sock
        """The listening socket: C accepts on its descriptor, this keeps it open."""
        self._c = native.Passthrough(sock.fileno(), cfg.mode == "transparent", cfg.connect_timeout,
                                     FIRST_BYTES_TIMEOUT, RELAY_MODES[cfg.relay], SPLICE_AFTER, PIPE_BYTES)
        self._live: dict[int, ConnState] = {}
        """Connections C relays, by its id: their conn record is written when they end."""
        self._verdicts: dict[int, Verdict] = {}
        self._old_verdicts: dict[int, Verdict] = {}
        """The verdicts before the last ``forget``: a connection decided just before it may
        still report (its records carry the verdict it was given)."""
        self._next_vid = 0
        self._stopping = False

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self._c.fileno(), self._events)
        self._c.start()

    def stop(self) -> None:
        """End everything C carries (records say ``shutdown``), then write what it reported."""
        self._stopping = True
        self._c.stop()
        asyncio.get_running_loop().remove_reader(self._c.fileno())
        self._events()
        self._sock.close()

    # -- what the Python path decided ------------------------------------------------

    def remember_head(self, head: bytes, ip: str, port: int) -> None:
        """A ``CONNECT`` head this path answered with 200, its target an address literal."""
        try:
            self._c.remember_head(head, ip, port)
        except ValueError:
            pass  # a scoped IPv6 literal, or a head over 8 KiB: this path keeps answering it

    def remember_sni(self, sni: str | None, verdict: Verdict) -> None:
        """The verdict on a server name, for a connection this path passes through or blocks."""
        if len(self._verdicts) >= VERDICTS_MAX:
            self._old_verdicts, self._verdicts = self._verdicts, {}
        vid = self._next_vid
        self._next_vid += 1
        self._verdicts[vid] = verdict
        self._c.remember_sni(sni, native.BLOCK if verdict.action == "block" else native.PASS, vid)

    def forget(self) -> None:
        """Another Engine: no remembered verdict may be applied again."""
        self._c.forget()
        self._old_verdicts, self._verdicts = self._verdicts, {}

    # -- what C did ------------------------------------------------------------------

    def _events(self) -> None:
        for ev in self._c.take():
            try:
                self._event(ev)
            except Exception as exc:  # one connection's record, never the listener
                log.error("passthrough event %r failed", ev[:E_PEER], exc_info=exc)
                self._fp.stats.errors += 1

    def _event(self, ev: tuple[Any, ...]) -> None:
        kind = ev[E_TYPE]
        if kind == native.HANDOFF:
            self._handed_over(ev)
        elif kind == native.CONNECTED:
            self._connected(ev)
        elif kind == native.FINISHED:
            state = self._live.pop(ev[E_CID], None)
            if state is not None:
                self._fp.stats.active -= 1
                self._end(state, ev)
        else:  # BLOCKED, FAILED, EARLY: C ended it before (or instead of) relaying
            self._ended(ev)

    def _handed_over(self, ev: tuple[Any, ...]) -> None:
        sock = socket.socket(fileno=ev[E_FD])
        resume = Resume(ev[E_TS], ev[E_PEER], ev[E_DATA] or b"", ev[E_HEAD], ev[E_DST] if ev[E_HEAD] else None)
        if self._stopping:
            # Accepted in the last moment: recorded as the Python path records a shutdown.
            self._not_adopted(ev, sock, resume, "shutdown")
            return
        side = _AcceptedSide(self._fp, resume)

        def adopted(result: Any, exc: BaseException | None) -> None:
            if exc is not None:  # the loop refused the socket: recorded, never lost
                self._not_adopted(ev, sock, resume, f"error: {type(exc).__name__}: {exc}"[:200])

        _Connect(asyncio.get_running_loop().connect_accepted_socket(lambda: side, sock), adopted).start()

    def _not_adopted(self, ev: tuple[Any, ...], sock: socket.socket, resume: Resume, reason: str) -> None:
        """A handed-over connection the Python path does not take: closed, and recorded."""
        sock.close()
        state = self._state(ev)
        state.close_reason = reason
        self._fp.finish(state, len(resume.data) + resume.connect_head, 0)

    def _remembered(self, vid: int) -> Verdict | None:
        """The verdict given to C as ``vid`` (None: dropped from both tables since)."""
        return self._verdicts.get(vid) or self._old_verdicts.get(vid)

    def _state(self, ev: tuple[Any, ...]) -> ConnState:
        """The connection as the Python path would have it: client, server, service."""
        fp = self._fp
        fp.stats.connections += 1
        peer_ip, peer_port = ev[E_PEER]
        state = ConnState(fp.conn_info(peer_ip, peer_port, ev[E_TS]))
        if fp.config.mode == "transparent" or ev[E_HEAD]:
            state.conn.server_ip, state.conn.server_port = ev[E_DST]
        state.service = "tls" if ev[E_TLS] else "http" if ev[E_HEAD] else None
        return state

    def _decision(self, state: ConnState, ev: tuple[Any, ...]) -> TlsDecision:
        """The decision C applied: the remembered verdict, the hello's fields."""
        hello = _hello(ev[E_DATA] or b"")
        sni = hello.sni if hello is not None else None
        fp = self._fp
        verdict = self._remembered(ev[E_VID]) or fp._sni_verdict(fp.engine, sni)
        decision = TlsDecision(verdict, sni, hello.alpn if hello else [], hello.versions if hello else [])
        decision.ts = ev[E_TS2]
        state.note(verdict)
        if fp.dns_names and state.conn.server_ip:
            state.conn.dns_name = fp.dns_names(state.conn.client_ip, state.conn.server_ip)
        return decision

    def _connected(self, ev: tuple[Any, ...]) -> None:
        fp = self._fp
        state = self._state(ev)
        decision = self._decision(state, ev)
        state.conn.nat_ip, state.conn.nat_port = ev[E_NAT]  # the server's address: ``_state``
        fp.stats.tls_passthrough += 1
        fp.stats.active += 1
        fp.tls_record(state, decision)
        self._live[ev[E_CID]] = state

    def _ended(self, ev: tuple[Any, ...]) -> None:
        fp = self._fp
        kind = ev[E_TYPE]
        state = self._state(ev)
        if kind == native.BLOCKED:
            decision = self._decision(state, ev)
            fp.stats.tls_blocked += 1
            fp.tls_record(state, decision)
        elif kind == native.FAILED:
            decision = self._decision(state, ev)
            fp.stats.tls_passthrough += 1
            host, port = ev[E_DST]
            err = ev[E_ERR]
            fp.connect_failed(state, host, port, TimeoutError() if err < 0 else OSError(err, os.strerror(err)))
            fp.tls_record(state, decision)
        elif ev[E_VID] >= 0:  # stopped while connecting: decided, not recorded as a tls record
            state.note(self._remembered(ev[E_VID]) or Verdict("allow"))
        self._end(state, ev)

    def _end(self, state: ConnState, ev: tuple[Any, ...]) -> None:
        state.close_reason = state.close_reason or _REASONS.get(ev[E_REASON], "fin")
        self._fp.finish(state, ev[E_UP], ev[E_DOWN], ev[E_END])


def _hello(data: bytes) -> ClientHello | None:
    try:
        return parse_client_hello(data)
    except (NeedMoreData, InputError):
        return None
