"""The HTTP(S) proxy as one service of ``linewarden run``: fast path + embedded mitmproxy.

Owns: building the fast path from the ``[http]`` config, and — only when some
domains are in interception scope (``http.intercept``) — an in-process
mitmproxy (``mitmproxy.master.Master`` on the same asyncio loop, regular mode
on an ephemeral loopback port, ``confdir`` = the unit's CA directory) carrying
the ``LinewardenHttp`` addon. Start/stop, and swapping the Engine on reload.

Must not: parse, decide or write SQL; hold configuration defaults of its own
(they are in linewarden/config.py's ``HttpConfig``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from proxy.fastpath import FastPath, FastPathConfig, as_engine_ref
from proxy.http_records import DnsNames
from storage.records import Record

log = logging.getLogger(__name__)

MITM_START_TIMEOUT = 20.0
"""Seconds mitmproxy may take to bind its loopback listener (it loads the CA first)."""


@dataclass(frozen=True, slots=True)
class HttpServiceConfig:
    """Everything the service needs; ``from_config`` maps linewarden's ``HttpConfig``."""

    fastpath: FastPathConfig = FastPathConfig()
    ca_dir: str = "./var/ca"
    upstream_verify: bool = True
    """Verify servers' certificates on intercepted connections (mitmproxy ``ssl_insecure`` off)."""

    @classmethod
    def from_config(cls, http: object) -> HttpServiceConfig:
        """From ``linewarden.config.HttpConfig`` (fields missing there keep our defaults)."""
        from linewarden.config import parse_hostport

        g = lambda name, default: getattr(http, name, default)  # noqa: E731
        fp = FastPathConfig(
            listen=parse_hostport(g("listen", "127.0.0.1:8080"), 8080),
            mode=g("mode", "explicit"),
            request_hold_max=g("request_hold_max", FastPathConfig.request_hold_max),
            response_hold_max=g("response_hold_max", FastPathConfig.response_hold_max),
            over_cap=g("over_cap", "stream"),
            scan_media=g("scan_media", False),
            intercept=tuple(g("intercept", ())),
            passthrough=tuple(g("passthrough", ())),
            blocked_by=g("blocked_by", "") or None,
            idle_timeout=g("idle_timeout_s", 300.0),
            connect_timeout=g("connect_timeout_s", 10.0),
            fail=g("fail", "open"),
            relay=g("relay", "auto"),
            native=g("native", True),
        )
        return cls(fp, g("ca_dir", "./var/ca"), g("upstream_verify", True))


class HttpProxyService:
    """``await start()`` / ``await stop()``; rule reloads go through the shared ``EngineRef``."""

    name = "http"

    def __init__(
        self,
        engine: object,
        submit: Callable[[Record], bool],
        config: HttpServiceConfig = HttpServiceConfig(),
        *,
        identity: object | None = None,
        dns_names: DnsNames | None = None,
    ) -> None:
        self.engine_ref = as_engine_ref(engine)
        """The app's ``EngineRef`` (or a fixed Engine): both paths read the current Engine from it."""
        self.submit = submit
        self.config = config
        self.identity = identity
        self.dns_names = dns_names
        self.nat_table: dict[str, tuple[str, int]] = {}
        self.fastpath: FastPath | None = None
        self.addon: object | None = None
        self.master: object | None = None
        self._master_task: asyncio.Task[None] | None = None
        self.mitm_address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the proxy listens (the real port when configured with port 0)."""
        return self.fastpath.address if self.fastpath else None

    async def start(self) -> None:
        fp_cfg = self.config.fastpath
        if fp_cfg.intercept:
            await self._start_mitmproxy()
        self.fastpath = FastPath(
            self.engine_ref, self.submit, fp_cfg, identity=self.identity, dns_names=self.dns_names,
            mitm_address=self.mitm_address, nat_table=self.nat_table,
        )
        try:
            await self.fastpath.start()
        except BaseException:
            await self._stop_mitmproxy()
            raise

    async def stop(self) -> None:
        if self.fastpath is not None:
            await self.fastpath.stop()
        await self._stop_mitmproxy()

    # -- embedded mitmproxy ---------------------------------------------------------

    async def _start_mitmproxy(self) -> None:
        from mitmproxy import options
        from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
        from mitmproxy.master import Master

        from proxy.http_addon import LinewardenHttp
        from proxy.tls_ca import load_ca

        fp = self.config.fastpath
        ca = load_ca(self.config.ca_dir)  # raises CaError with the `ca init` hint
        opts = options.Options()
        master = Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
        addon = LinewardenHttp(self.engine_ref, self.submit, identity=self.identity,
                               dns_names=self.dns_names, nat_table=self.nat_table)
        ps = proxyserver.Proxyserver()
        master.addons.add(core.Core(), ps, next_layer.NextLayer(), tlsconfig.TlsConfig(), addon)
        opts.update(
            mode=["regular@127.0.0.1:0"],
            confdir=str(ca.directory),
            ssl_insecure=not self.config.upstream_verify,
            # The hold window: mitmproxy buffers text bodies up to it, streams past it.
            stream_large_bodies=str(max(fp.response_hold_max, fp.request_hold_max)),
            linewarden_request_hold_max=fp.request_hold_max,
            linewarden_response_hold_max=fp.response_hold_max,
            linewarden_over_cap=fp.over_cap,
            linewarden_scan_media=fp.scan_media,
            linewarden_blocked_by=fp.blocked_by or "",
            linewarden_fail=fp.fail,
        )
        self.master, self.addon = master, addon
        self._master_task = asyncio.get_running_loop().create_task(master.run())
        async with asyncio.timeout(MITM_START_TIMEOUT):
            while not ps.listen_addrs():
                if self._master_task.done():
                    self._master_task.result()
                    raise RuntimeError("mitmproxy stopped while starting")
                await asyncio.sleep(0.02)
        host, port = ps.listen_addrs()[0][:2]
        self.mitm_address = (host, port)
        log.info("interception proxy (mitmproxy) on %s:%d", host, port)

    async def _stop_mitmproxy(self) -> None:
        if self.master is None or self._master_task is None:
            return
        self.master.shutdown()  # type: ignore[attr-defined]
        try:
            async with asyncio.timeout(10):
                await self._master_task
        except (TimeoutError, asyncio.CancelledError):
            self._master_task.cancel()
        self.master = None
        self._master_task = None
