"""The local control socket: `linewarden rules push|rollback` talking to `linewarden run`.

Owns: the socket (server and client) and its wire format. Must not: decide whether a
bundle is acceptable (linewarden/reload.py and rules/bundle.py do).

Access control is the file's: the socket is created with mode 0600 (only the user the
service runs as may connect) or 0660 with ``rules.control_group`` (members of that
group too). It is bound under a temporary name, given its mode and group, then
renamed into place, so it is never reachable with looser permissions. The server
learns who connected from the kernel (SO_PEERCRED: uid, gid, pid of the peer, not
spoofable by the client) and writes it into the Maintenance record.

Wire format (one request per connection): the client sends one JSON line
``{"op": "push"|"rollback"|"status", "size": N, "allow_downgrade": bool}`` followed by
``N`` bytes of payload (the bundle for ``push``); the server answers one JSON line
(``linewarden.reload.Result.as_dict``) and closes.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("linewarden.control")

MAX_REQUEST_LINE = 64 * 1024
"""The JSON request line; a real one is under 100 bytes."""
MAX_PAYLOAD = 1 << 30
"""A pushed bundle: rules/bundle.py's ``MAX_BUNDLE_BYTES``."""
CLIENT_TIMEOUT_S = 600.0
"""How long the client waits for the answer: a large rule set compiles in every worker."""
READ_TIMEOUT_S = 60.0
"""A connected client must have sent its request within this."""


class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


Handler = Callable[[dict[str, Any], bytes, Peer], Awaitable[dict[str, Any]]]


def peer_of(sock: socket.socket) -> Peer:
    """The connected process's credentials, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


class ControlServer:
    def __init__(self, path: Path, handler: Handler, *, group: str = "") -> None:
        self.path = path
        self.handler = handler
        self.group = group
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        old = os.umask(0o177)  # bound with 0600 already: no window with looser rights
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(tmp),
                                                           limit=MAX_REQUEST_LINE)
        finally:
            os.umask(old)
        if self.group:
            os.chown(tmp, -1, grp.getgrnam(self.group).gr_gid)
            os.chmod(tmp, 0o660)
        else:
            os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        log.info("control socket %s (mode %s)", self.path, "0660" if self.group else "0600")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    line = await reader.readline()
                    req = json.loads(line)
                    size = int(req.get("size", 0))
                    if not 0 <= size <= MAX_PAYLOAD:
                        raise ValueError(f"payload of {size} bytes; at most {MAX_PAYLOAD}")
                    payload = await reader.readexactly(size)
            except (ValueError, TypeError, AttributeError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, TimeoutError) as e:
                answer: dict[str, Any] = {"ok": False, "errors": [f"bad request: {e}"]}
            else:
                try:
                    answer = await self.handler(req, payload, peer)
                except Exception as e:  # the caller hears about it; the service keeps running
                    log.exception("control request %r failed", req.get("op"))
                    answer = {"ok": False, "errors": [f"internal error: {type(e).__name__}: {e}"]}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except Exception:
            log.exception("control connection failed")
        finally:
            writer.close()


def request(path: str | os.PathLike[str], op: str, payload: bytes = b"", *,
            timeout: float = CLIENT_TIMEOUT_S, **args: Any) -> dict[str, Any]:
    """Client side (blocking): send one request, return the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"op": op, "size": len(payload), **args}).encode() + b"\n")
        s.sendall(payload)
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError(f"{path}: the server closed the connection without answering")
    return json.loads(buf)
