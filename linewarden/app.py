"""The composition: one process that runs the store writer and the services.

Owns: building the parts from a ``Config`` (writer, Engine reference,
identity, services), the start order (writer first, then each service) and
the stop order (services in reverse, so their last records reach the writer,
then the writer flushes and closes), and the signals: SIGTERM/SIGINT stop
cleanly and lose nothing; SIGHUP re-reads the configured rule directory, and
the control socket takes pushes and rollbacks (linewarden/reload.py, issue 7). Must not: hold product logic (DESIGN.md: keep it thin).

A service is anything with ``name``, ``async start()`` and ``async stop()``.
Today: the DNS shim (in-process when ``dns.workers = 0``, else worker
processes, linewarden/workers.py). The HTTP(S) proxy (issue 4) plugs in by
adding a factory to ``SERVICE_FACTORIES``: it receives the ``App`` (config,
writer, engine reference, identity) and returns its service, or None when
disabled. Factories run in order; services start in that order.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from linewarden.config import Config

log = logging.getLogger("linewarden")


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def dns_service(app: App) -> Service | None:
    """The DNS shim, in this process or as worker processes (``dns.workers``)."""
    cfg = app.config
    if not cfg.dns.enabled:
        return None
    upstreams = [_hostport(u) for u in app.upstreams]
    if not upstreams:
        log.warning("dns: no upstream configured and none in /etc/resolv.conf; "
                    "every allowed query will get SERVFAIL")
    if cfg.dns.workers == 0:
        from proxy.dns_shim import DnsShim

        return DnsShim(cfg.dns, app.engine_ref, app.writer, app.identity, upstreams=upstreams)
    from linewarden.workers import DnsWorkers, WorkerSpec

    spec = WorkerSpec(dns=cfg.dns, rules_dir=str(app.rules_dir), backend=cfg.rules.backend,
                      bindings=cfg.identity, upstreams=tuple(upstreams),
                      fail_open=app.store_config.overflow == "fail-open", count=cfg.dns.workers)
    return DnsWorkers(spec, app.writer)


def _hostport(text: str) -> tuple[str, int]:
    from linewarden.config import parse_hostport

    return parse_hostport(text, 53)


def http_service(app: App) -> Service | None:
    """The HTTP(S) proxy (issue 4): fast path, plus mitmproxy when ``http.intercept`` is set."""
    if not app.config.http.enabled:
        return None
    from linewarden.workers import HttpWorkers, HttpWorkerSpec
    from proxy.http_service import HttpProxyService, HttpServiceConfig

    cfg = HttpServiceConfig.from_config(app.config.http)
    if app.config.http.workers == 0:
        return HttpProxyService(app.engine_ref, app.writer.submit, cfg, identity=app.identity)
    spec = HttpWorkerSpec(config=cfg, rules_dir=str(app.rules_dir), backend=app.config.rules.backend,
                          bindings=app.config.identity, fail_open=app.store_config.overflow == "fail-open",
                          count=app.config.http.workers)
    return HttpWorkers(spec, app.writer)


SERVICE_FACTORIES: list[Callable[[App], Service | None]] = [dns_service, http_service]
"""Builders of the services, in start order. The HTTP proxy appends its own."""


class App:
    """All the parts of one ``linewarden run``."""

    def __init__(self, config: Config) -> None:
        from linewarden.dnsjoin import JOIN_HOLD_S, DnsJoin, JoinSink
        from proxy.dns_shim import EngineRef
        from proxy.identity import Identity
        from rules.engine import Engine
        from storage.writer import RecordWriter

        self.config = config
        from linewarden.reload import startup_rules_dir

        self.rules_dir = startup_rules_dir(config)
        """The active rule set: an installed (pushed) one, else ``rules.dir``, else the sample."""
        self.engine_ref = EngineRef(Engine.from_dir(self.rules_dir, backend=config.rules.backend))
        """The current Engine; a reload (issue 7) swaps it here and every adapter sees it."""
        self.identity = Identity(config.identity)
        self.store_config = config.store.store_config()
        Path(config.store.dir).mkdir(parents=True, exist_ok=True)
        # Without the shim no Dns record can come to name a Conn: nothing waits for one.
        join = DnsJoin(hold_s=JOIN_HOLD_S if config.dns.enabled else 0.0)
        self.writer = JoinSink(RecordWriter(config.store.dir, self.store_config), join)
        """The store writer behind the dns_name join (linewarden/dnsjoin.py): every record of
        every service and worker passes here, so conn records get the name their client
        resolved through the shim."""
        self.upstreams = config.resolved_upstreams()
        self.services: list[Service] = []
        self._stop = asyncio.Event()
        self.rules_manager: Any = None
        self.control: Any = None

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the configured rule directory off the data path (linewarden/reload.py)."""
        if self.rules_manager is None:
            log.warning("SIGHUP before the services started: ignored")
            return
        task = asyncio.get_running_loop().create_task(self.rules_manager.reload_configured("SIGHUP"))
        self._reloads = getattr(self, "_reloads", set()) | {task}
        task.add_done_callback(self._reloads.discard)

    async def start(self) -> None:
        await self.writer.start()
        try:
            for factory in SERVICE_FACTORIES:
                service = factory(self)
                if service is None:
                    continue
                await service.start()
                self.services.append(service)
            from linewarden.reload import start_control

            self.rules_manager, self.control = await start_control(self)
        except BaseException:
            await self.stop()
            raise
        # Every record of every worker is decoded here and waits in the writer's queue: keep
        # the cyclic GC from walking the compiled rule set over and over while it does (the
        # workers do the same). Measured: ~1.6 us less per DNS record in this process.
        gc.collect()
        gc.freeze()

    def _yield_to_workers(self) -> None:
        """``store.nice``: where worker processes do all the answering and stop taking work
        while this process (which records) is behind, this process runs nicer than they do
        (``workers.lower_priority`` says why). The HTTP workers do not stop accepting
        connections when the store is behind, so with them a starved main process could
        let their record buffers overflow: there both keep the same priority."""
        from linewarden.workers import WorkerPool, lower_priority

        nice = self.config.store.nice
        if nice and self.services and all(isinstance(s, WorkerPool) and s.holds_intake for s in self.services):
            changed = lower_priority(nice)
            log.info("main process: %d threads %d nicer than the workers (store.nice)", changed, nice)

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
            self.control = None
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", service.name)
        self.services.clear()
        await self.writer.close()

    async def run(self, on_ready: Callable[[App], Any] | None = None) -> None:
        """Start, wait for SIGTERM/SIGINT, stop. ``on_ready`` is called once serving."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            self._yield_to_workers()  # here, not in start(): an in-process App leaves its caller's priority
            if on_ready is not None:
                on_ready(self)
            await self._stop.wait()
            log.info("stopping")
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
