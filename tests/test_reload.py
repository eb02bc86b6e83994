"""linewarden/reload.py and linewarden/control.py: push, rollback and SIGHUP reload with a
real Engine reference and record list, and the control socket's access and wire format."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest

from linewarden import keys
from linewarden.control import ControlServer, Peer, request
from linewarden.reload import RulesManager, installed_dir, peer_name
from proxy.dns_shim import EngineRef
from rules.bundle import pack
from rules.engine import Engine
from storage.records import Alarm, Maintenance

NOW = datetime(2026, 11, 28, tzinfo=timezone.utc)


def ruleset(d: Path, version: int, domain: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ruleset.toml").write_text(f'name = "t"\nversion = {version}\n[categories.ads]\naction = "block"\n')
    (d / "domains.tsv").write_text(f"id\tcategory\tdomain\nD1\tads\t{domain}\n")
    return d


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pair = keys.generate(tmp / "keys")
        self.configured = ruleset(tmp / "conf", 1, "one.test")
        self.ref = EngineRef(Engine.from_dir(self.configured))
        self.records: list[object] = []
        self.manager = RulesManager(
            engine_ref=self.ref, submit=lambda r: self.records.append(r) or True,
            managed=tmp / "managed", configured=self.configured, active=self.configured,
            backend="auto", pubkeys=[self.pair.public], workers=lambda: [])

    def bundle(self, version: int, domain: str, pair: keys.KeyPair | None = None) -> bytes:
        d = ruleset(self.tmp / f"src{version}{domain}", version, domain)
        out = self.tmp / f"b{version}{domain}"
        pack(d, out, pair or self.pair, now=NOW)
        return out.read_bytes()

    def blocks(self, name: str) -> bool:
        return self.ref.engine.dns(name).action == "block"

    def ops(self) -> list[tuple[str | None, str, int | None]]:
        return [(r.operation, (r.result or "").split(":")[0], r.ruleset_version)
                for r in self.records if isinstance(r, Maintenance)]


async def test_push_swaps_and_records(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.manager.snapshot_active()
    old = rig.ref.engine
    res = await rig.manager.push(rig.bundle(2, "two.test"), "alice (uid 1000)")
    assert res.ok and (res.version, res.previous_version) == (2, 1), res
    assert rig.blocks("two.test") and not rig.blocks("one.test")
    assert old.dns("one.test").action == "block"  # in-flight holders keep their Engine
    assert rig.ops() == [("rules.push", "ok", 2)]
    [m] = [r for r in rig.records if isinstance(r, Maintenance)]
    assert m.admin == "alice (uid 1000)" and m.source_ip == "local" and "t v2" in (m.target or "")
    assert [a.alarm_kind for a in rig.records if isinstance(a, Alarm)] == ["rules_reloaded"]
    assert installed_dir(tmp_path / "managed") is not None
    assert not list((tmp_path / "managed" / "incoming").iterdir())


async def test_refusals_leave_the_running_rules_and_raise_an_alarm(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.manager.snapshot_active()
    other = keys.generate(tmp_path / "other")
    for data, why in [(rig.bundle(2, "two.test", other), "bad signature"),
                      (rig.bundle(1, "same.test"), "not higher than the running version 1"),
                      (b"garbage", "not a readable bundle")]:
        res = await rig.manager.push(data, "bob (uid 1001)")
        assert not res.ok and why in res.errors[0], res
        assert rig.ref.engine.version == 1 and rig.blocks("one.test")
    assert rig.ops() == [("rules.push", "rejected", 1)] * 3
    assert [a.alarm_kind for a in rig.records if isinstance(a, Alarm)] == ["rules_rejected"] * 3


async def test_downgrade_needs_the_flag_and_is_recorded(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.manager.snapshot_active()
    assert (await rig.manager.push(rig.bundle(5, "five.test"), "a")).ok
    assert not (await rig.manager.push(rig.bundle(3, "three.test"), "a")).ok
    res = await rig.manager.push(rig.bundle(3, "three.test"), "a", allow_downgrade=True)
    assert res.ok and rig.blocks("three.test")
    assert rig.ops()[-1] == ("rules.push --allow-downgrade", "ok", 3)


async def test_rollback_toggles_between_current_and_previous(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    assert not (await rig.manager.rollback("a")).ok  # nothing installed yet
    await rig.manager.snapshot_active()
    ruleset(rig.configured, 9, "edited.test")  # the configured dir changes meanwhile
    assert (await rig.manager.push(rig.bundle(2, "two.test"), "a")).ok
    res = await rig.manager.rollback("a")
    assert res.ok and rig.ref.engine.version == 1 and rig.blocks("one.test")  # the snapshot, not the edit
    assert (await rig.manager.rollback("a")).ok and rig.blocks("two.test")
    assert len(list((tmp_path / "managed" / "slots").iterdir())) == 2  # current + previous only


async def test_sighup_reload_reads_the_configured_dir_and_refuses_a_broken_one(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.manager.snapshot_active()
    ruleset(rig.configured, 2, "hup.test")
    assert (await rig.manager.reload_configured("SIGHUP")).ok and rig.blocks("hup.test")
    (rig.configured / "domains.tsv").write_text("id\tcategory\tdomain\nD1\tnope\tx.test\n")
    res = await rig.manager.reload_configured("SIGHUP")
    assert not res.ok and "unknown category 'nope'" in res.errors[0]
    assert rig.blocks("hup.test")
    assert rig.ops() == [("rules.reload", "ok", 2), ("rules.reload", "rejected", 2)]


async def test_concurrent_pushes_run_one_at_a_time(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.manager.snapshot_active()
    a, b = rig.bundle(2, "a.test"), rig.bundle(3, "b.test")
    results = await asyncio.gather(rig.manager.push(a, "x"), rig.manager.push(b, "y"))
    assert [r.ok for r in results] == [True, True] and rig.ref.engine.version == 3


# ------------------------------------------------------------------------ the socket


async def test_control_socket_mode_peer_and_wire_format(tmp_path: Path) -> None:
    seen: list[tuple[dict, bytes, Peer]] = []

    async def handler(req: dict, payload: bytes, peer: Peer) -> dict:
        seen.append((req, payload, peer))
        return {"ok": True, "echo": len(payload)}

    path = tmp_path / "run" / "control.sock"
    server = ControlServer(path, handler)
    await server.start()
    try:
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, lambda: request(path, "push", b"x" * 100_000,
                                                                  allow_downgrade=True))
        assert answer == {"ok": True, "echo": 100_000}
        req, payload, peer = seen[0]
        assert req == {"op": "push", "size": 100_000, "allow_downgrade": True} and payload == b"x" * 100_000
        assert (peer.uid, peer.gid) == (os.getuid(), os.getgid())

        def raw(data: bytes) -> dict:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(path))
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                return json.loads(s.makefile("rb").readline())

        bad = await loop.run_in_executor(None, raw, b"not json\n")
        assert not bad["ok"] and bad["errors"][0].startswith("bad request")
        big = await loop.run_in_executor(None, raw, b'{"op": "push", "size": 99999999999}\n')
        assert "at most" in big["errors"][0]
        short = await loop.run_in_executor(None, raw, b'{"op": "push", "size": 10}\nabc')
        assert not short["ok"] and len(seen) == 1
    finally:
        await server.stop()
    assert not path.exists()


def test_peer_name() -> None:
    assert peer_name(0) == "root (uid 0)"
    assert peer_name(2_000_000_000) == "uid 2000000000"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown the socket to a group")
async def test_control_group_gives_mode_0660(tmp_path: Path) -> None:
    async def handler(req: dict, payload: bytes, peer: Peer) -> dict:
        return {"ok": True}

    server = ControlServer(tmp_path / "c.sock", handler, group="root")
    await server.start()
    try:
        assert stat.S_IMODE((tmp_path / "c.sock").stat().st_mode) == 0o660
    finally:
        await server.stop()
