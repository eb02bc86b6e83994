"""Rule reload orchestration: push, SIGHUP re-read, rollback (issue 7).

Owns: the managed rules directory (installed rule sets, the current and the previous
one), the order of a reload, and its records. Must not: parse bundles (rules/bundle.py)
or rule files (rules/ruleset.py), or block the event loop: verification and compiling
run in a thread, off the data path.

Order of one reload (pushes, SIGHUP and rollbacks run one at a time, under one lock):
1. verify (push only: rules/bundle.py's acceptance checks) and compile a new Engine in a
   worker thread. Any failure: the running rules stay, an Alarm record
   (``rules_rejected``) and a Maintenance record are written, the errors go back to
   the caller.
2. install the rule files as a new slot of the managed directory;
3. tell every worker process to compile the slot and swap (``L``/``A`` frames,
   linewarden/workers.py); if one fails, those that swapped are told to go back and
   the reload is refused as in 1;
4. swap the main process's ``EngineRef`` (one attribute assignment: a query or
   transaction reads it once, so those in flight finish with the Engine they began
   with), and write ``state.json`` (current, previous) atomically;
5. records: Maintenance (who, ``rules.push``/``rules.reload``/``rules.rollback``, the
   version, ``ok``) and Alarm ``rules_reloaded``.

Managed directory layout (``rules.managed_dir``, default ``<store>/rules``)::

    state.json            {"current": SLOT, "origin": push|rollback|reload|initial,
                           "previous": SLOT | null}
    slots/SLOT/           ruleset.toml, *.tsv (+ manifest.json of a pushed bundle)
    incoming/             bundles being verified (removed afterwards)

Only the current and the previous slot are kept. At start, the rule set compiled from
``rules.dir`` is copied in as a slot (``initial``), so it can be rolled back to.
At start, ``run`` loads the installed current slot when it came from a push or a
rollback (it is what the appliance was running); otherwise (``initial``, ``reload``)
the configured ``rules.dir``, which may have been edited since. ``state.json`` is written by
tmp-file + rename, so a crash leaves the old or the new state, never half of one.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("linewarden.reload")

STATE = "state.json"


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class Result:
    """What a reload did: the control socket sends it back as JSON."""

    ok: bool
    operation: str
    version: int | None = None
    previous_version: int | None = None
    errors: list[str] = field(default_factory=list)
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "operation": self.operation, "version": self.version,
                "previous_version": self.previous_version, "errors": self.errors,
                "message": self.message}


def installed_dir(managed: Path, origins: tuple[str, ...] = ()) -> Path | None:
    """The current installed rule set of ``managed`` (None: nothing installed, or its
    origin is not one of ``origins`` when given)."""
    try:
        state = json.loads((managed / STATE).read_text())
    except (OSError, ValueError):
        return None
    if origins and state.get("origin") not in origins:
        return None
    cur = state.get("current")
    d = managed / "slots" / str(cur) if cur else None
    return d if d is not None and (d / "ruleset.toml").is_file() else None


class RulesManager:
    """Reloads for one running appliance.

    ``engine_ref``: the main process's ``EngineRef``; ``submit``: the record writer's
    ``submit``; ``workers``: returns the worker-process services (objects with
    ``workers`` and ``spec.rules_dir``); ``pubkeys``: trusted Ed25519 public keys.
    """

    def __init__(self, *, engine_ref: Any, submit: Callable[[Any], bool], managed: Path,
                 configured: Path, active: Path, backend: str, pubkeys: Sequence[Any],
                 workers: Callable[[], list[Any]], on_swap: Callable[[Path], None] | None = None) -> None:
        self.engine_ref = engine_ref
        self.submit = submit
        self.managed = managed
        self.configured = configured
        self.active = active
        """The directory the running rules were compiled from."""
        self.backend = backend
        self.pubkeys = list(pubkeys)
        self.workers = workers
        self.on_swap = on_swap
        self._lock = asyncio.Lock()
        (managed / "slots").mkdir(parents=True, exist_ok=True)

    # -- operations ------------------------------------------------------------------

    async def push(self, bundle: bytes, who: str, *, allow_downgrade: bool = False) -> Result:
        """Verify, install and activate a signed bundle."""
        from rules.bundle import BundleError, verify_bundle

        async with self._lock:
            running = self.engine_ref.engine.version
            incoming = self.managed / "incoming"
            incoming.mkdir(exist_ok=True)
            work = incoming / f"{now_us()}"
            path = work.with_suffix(".bundle")
            path.write_bytes(bundle)
            op = "rules.push" + (" --allow-downgrade" if allow_downgrade else "")
            try:
                loop = asyncio.get_running_loop()
                try:
                    b = await loop.run_in_executor(None, lambda: verify_bundle(
                        path, self.pubkeys, work, running_version=running,
                        allow_downgrade=allow_downgrade))
                except BundleError as e:
                    return self._refused(op, who, running, None, e.reasons)
                if b.version <= running:
                    log.warning("downgrade %d -> %d allowed by %s", running, b.version, who)
                target = f"{b.name} v{b.version} (signed by {b.key}, manifest sha256 {b.manifest_sha256[:16]})"
                return await self._activate(op, who, b.dir / "rules", target, move=True, origin="push",
                                            ruleset=b.ruleset)
            finally:
                path.unlink(missing_ok=True)
                shutil.rmtree(work, ignore_errors=True)

    async def reload_configured(self, who: str) -> Result:
        """SIGHUP: re-read the configured rule directory (``rules.dir``) and activate it."""
        async with self._lock:
            return await self._activate("rules.reload", who, self.configured,
                                        str(self.configured), move=False, origin="reload")

    async def rollback(self, who: str) -> Result:
        """Activate the previous installed rule set (the current one becomes previous)."""
        async with self._lock:
            state = self._state()
            prev = state.get("previous")
            d = self.managed / "slots" / str(prev) if prev else None
            if d is None or not (d / "ruleset.toml").is_file():
                return self._refused("rules.rollback", who, self.engine_ref.engine.version, None,
                                     ["no previous rule set to roll back to"])
            return await self._activate("rules.rollback", who, d, f"slot {prev}", move=False,
                                        slot=str(prev), origin="rollback")

    async def snapshot_active(self) -> None:
        """At start: copy the rule set just compiled from ``rules.dir`` into a slot, so a
        later rollback returns to exactly it even when the directory is edited meanwhile.
        (Nothing to do when the running rules are an installed slot already.)"""
        if self.active.parent == self.managed / "slots":
            return
        slot = f"v{self.engine_ref.engine.version}-initial-{now_us()}"
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: _copy_rules(self.active, self.managed / "slots" / slot))
        self._set_current(slot, "initial")
        self.active = self.managed / "slots" / slot

    # -- the steps ---------------------------------------------------------------------

    async def _activate(self, op: str, who: str, src: Path, target: str, *, move: bool,
                        origin: str, slot: str | None = None, ruleset: Any = None) -> Result:
        from rules.engine import Engine
        from rules.errors import RuleSetError

        loop = asyncio.get_running_loop()
        old = self.engine_ref.engine
        try:
            engine = await loop.run_in_executor(None, lambda: (
                Engine.compile(ruleset, backend=self.backend) if ruleset is not None
                else Engine.from_dir(src, backend=self.backend)))
        except RuleSetError as e:
            return self._refused(op, who, old.version, None, [str(p) for p in e.problems[:50]])
        except Exception as e:  # a compile failure of any kind leaves the rules running
            return self._refused(op, who, old.version, None, [f"{type(e).__name__}: {e}"])
        if slot is None:
            slot = f"v{engine.version}-{now_us()}"
            dest = self.managed / "slots" / slot
            if move:
                os.replace(src, dest)
            else:
                await loop.run_in_executor(None, lambda: _copy_rules(src, dest))
        dest = self.managed / "slots" / slot
        errors = await self._reload_workers(str(dest))
        if errors:
            await self._reload_workers(str(self.active))
            if slot != self._state().get("previous"):
                shutil.rmtree(dest, ignore_errors=True)
            return self._refused(op, who, old.version, engine.version, errors)
        self.engine_ref.swap(engine)
        gc.freeze()  # as at start (linewarden/app.py): the cyclic GC need not walk the rule set
        self._set_current(slot, origin)
        self.active = dest
        if self.on_swap is not None:
            self.on_swap(dest)
        msg = f"{engine.name} version {old.version} -> {engine.version} active"
        self._record(op, who, target, "ok", engine.version, "rules_reloaded", f"{op} by {who}: {msg}")
        log.info("%s by %s: %s", op, who, msg)
        return Result(True, op, engine.version, old.version, [], msg)

    async def _reload_workers(self, rules_dir: str) -> list[str]:
        from linewarden.workers import reload_worker

        errors: list[str] = []
        for service in self.workers():
            answers = await asyncio.gather(*(reload_worker(h, rules_dir) for h in service.workers))
            for h, a in zip(service.workers, answers):
                if not a.get("ok"):
                    errors.append(f"{service.name} worker {h.index}: {a.get('error')}")
            if not errors:
                import dataclasses

                service.spec = dataclasses.replace(service.spec, rules_dir=rules_dir)
        return errors

    def _refused(self, op: str, who: str, running: int, version: int | None,
                 errors: list[str]) -> Result:
        detail = f"{op} by {who} refused; rules version {running} still active: " + "; ".join(errors)
        self._record(op, who, f"version {version}" if version is not None else "bundle",
                     "rejected: " + "; ".join(errors)[:2000], running, "rules_rejected", detail[:4000])
        log.error("%s", detail)
        return Result(False, op, version, running, errors, f"refused; version {running} still active")

    def _record(self, op: str, who: str, target: str, result: str, version: int | None,
                alarm: str, detail: str) -> None:
        from storage.records import Alarm, Maintenance

        ts = now_us()
        self.submit(Maintenance(ts=ts, admin=who, operation=op, target=target, result=result,
                                source_ip="local", ruleset_version=version))
        self.submit(Alarm(ts=ts, alarm_kind=alarm, detail=detail, ruleset_version=version))

    # -- state.json --------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads((self.managed / STATE).read_text())
        except (OSError, ValueError):
            return {}

    def _current_dir(self) -> Path | None:
        return installed_dir(self.managed)

    def _set_current(self, slot: str, origin: str) -> None:
        state = self._state()
        cur = state.get("current")
        new = {"current": slot, "origin": origin,
               "previous": cur if cur != slot else state.get("previous")}
        tmp = self.managed / f".{STATE}.tmp"
        tmp.write_text(json.dumps(new) + "\n")
        os.replace(tmp, self.managed / STATE)
        keep = {new["current"], new["previous"]}
        for d in (self.managed / "slots").iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


def _copy_rules(src: Path, dest: Path) -> None:
    from rules.bundle import BUNDLE_FILES

    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.mkdir(parents=True)
    for f in BUNDLE_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, tmp / f)
    os.replace(tmp, dest)


def peer_name(uid: int) -> str:
    """``alice (uid 1000)`` for the Maintenance record's ``admin``."""
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


# -- composition: what `linewarden run` plugs in (linewarden/app.py) ------------------------


def managed_dir(config: Any) -> Path:
    return Path(config.rules.managed_dir or Path(config.store.dir) / "rules")


def control_path(config: Any) -> Path:
    return Path(config.rules.control_socket or Path(config.store.dir) / "control.sock")


def startup_rules_dir(config: Any) -> Path:
    """The rule set `run` starts with: the installed one when a push or reload installed
    one (it is what was running), else the configured ``rules.dir`` (or the sample)."""
    from rules.engine import SAMPLE_RULES

    installed = installed_dir(managed_dir(config), ("push", "rollback"))
    if installed is not None:
        return installed
    return Path(config.rules.dir) if config.rules.dir else SAMPLE_RULES


async def start_control(app: Any) -> tuple[RulesManager, Any]:
    """Build the ``RulesManager`` of ``app`` and serve the control socket."""
    from linewarden import keys
    from linewarden.config import ConfigError
    from linewarden.control import ControlServer, Peer
    from rules.engine import SAMPLE_RULES

    cfg = app.config
    pubkeys = []
    for p in cfg.rules.pubkeys:
        try:
            pubkeys.append(keys.load_public(p))
        except (keys.KeyProblem, ValueError, OSError) as e:
            raise ConfigError(f"rules.pubkeys: {p}: {e}") from None

    def on_swap(d: Path) -> None:
        app.rules_dir = d

    manager = RulesManager(
        engine_ref=app.engine_ref, submit=app.writer.submit, managed=managed_dir(cfg),
        configured=Path(cfg.rules.dir) if cfg.rules.dir else SAMPLE_RULES, active=app.rules_dir,
        backend=cfg.rules.backend, pubkeys=pubkeys, on_swap=on_swap,
        workers=lambda: [s for s in app.services if hasattr(s, "spec") and hasattr(s, "workers")])

    async def handle(req: dict[str, Any], payload: bytes, peer: Peer) -> dict[str, Any]:
        who = peer_name(peer.uid)
        op = req.get("op")
        if op == "push":
            return (await manager.push(payload, who, allow_downgrade=bool(req.get("allow_downgrade")))).as_dict()
        if op == "rollback":
            return (await manager.rollback(who)).as_dict()
        if op == "reload":
            return (await manager.reload_configured(who)).as_dict()
        if op == "status":
            e = app.engine_ref.engine
            return {"ok": True, "operation": "status", "version": e.version, "name": e.name,
                    "rules_dir": str(app.rules_dir), "errors": [], "message": ""}
        return {"ok": False, "errors": [f"unknown op {op!r} (push, rollback, reload, status)"]}

    await manager.snapshot_active()
    server = ControlServer(control_path(cfg), handle, group=cfg.rules.control_group)
    await server.start()
    return manager, server
