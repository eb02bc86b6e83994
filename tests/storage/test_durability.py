"""A committed record survives kill -9; SIGTERM and SIGINT lose nothing.

The child is a real writer process fed under load; it reports the count of acknowledged
(committed) records on stdout after each ``flush()``. The parent kills it at a random
moment, reopens the store, runs ``verify`` and checks every acknowledged record is there.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage.config import StoreConfig
from storage.query import query
from storage.verify import verify_store
from storage.writer import RecordWriter

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import asyncio, sys, time
    sys.path.insert(0, {root!r})
    from storage.config import StoreConfig
    from storage.records import Conn
    from storage.writer import RecordWriter

    async def main(store, prefix):
        w = RecordWriter(store, StoreConfig(commit_interval_ms=20, overflow="fail-closed"))
        await w.start()
        seq = 0
        deadline = time.monotonic() + 60  # bounded even if nobody kills us
        while time.monotonic() < deadline:
            now = int(time.time() * 1_000_000)
            for _ in range(500):  # a burst, as a busy line produces
                if w.submit(Conn(ts=now, uid=f"{{prefix}}-{{seq}}", account="load", bytes_up=seq)):
                    seq += 1
            await w.flush()
            print(w.committed, flush=True)  # acknowledged: these are durable now
            await asyncio.sleep(0)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def run_and_kill(store: Path, prefix: str, rng: random.Random) -> int:
    """Start a writer child, let it commit for a random while, kill -9; the last ack."""
    p = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(store), prefix],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = 0
    try:
        want = rng.randint(2_000, 8_000)
        t0 = time.monotonic()
        assert p.stdout is not None
        while acked < want and time.monotonic() - t0 < 30:
            line = p.stdout.readline()
            if not line:
                break
            acked = int(line)
        p.send_signal(signal.SIGKILL)
        # acks already written by the child before it died count too
        for line in p.stdout:
            acked = max(acked, int(line))
    finally:
        p.kill()
        p.wait(timeout=10)
    assert acked > 0, p.stderr.read() if p.stderr else ""
    return acked


def uids(store: Path, prefix: str) -> set[str]:
    return {r.uid for r in query(store, kind="conn", account="load") if r.uid.startswith(prefix + "-")}


def reopen(store: Path) -> None:
    import asyncio

    async def go():
        w = RecordWriter(store, StoreConfig())
        await w.start()
        await w.close()

    asyncio.run(go())


@pytest.mark.parametrize("rounds", [3, pytest.param(12, marks=pytest.mark.slow)])
def test_kill_9_loses_no_acknowledged_record(tmp_path, rounds):
    store = tmp_path / "store"
    rng = random.Random(rounds)
    for k in range(rounds):
        prefix = f"r{k}"
        acked = run_and_kill(store, prefix, rng)
        # verify straight after the crash (unsigned tail is allowed), then after reopening
        before = verify_store(store)
        assert before.ok, before.problems
        reopen(store)
        after = verify_store(store)
        assert after.ok, after.problems
        got = uids(store, prefix)
        missing = [i for i in range(acked) if f"{prefix}-{i}" not in got]
        assert not missing, f"round {k}: {len(missing)} acknowledged records lost, first {missing[:5]}"


SIGNAL_CHILD = textwrap.dedent("""
    import asyncio, sys, time
    sys.path.insert(0, {root!r})
    from storage.config import StoreConfig
    from storage.records import Conn
    from storage.writer import RecordWriter

    async def main(store, n):
        # Nothing would be committed for a minute on its own: only the signal flushes.
        w = RecordWriter(store, StoreConfig(commit_interval_ms=60_000, batch_max=1_000_000))
        await w.start()
        done = asyncio.Event()
        w.install_signal_handlers(then=done.set)
        now = int(time.time() * 1_000_000)
        for i in range(n):
            w.submit(Conn(ts=now, uid=f"s-{{i}}", account="sig"))
        print("ready", flush=True)
        await asyncio.wait_for(done.wait(), 60)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_flush_everything_submitted(tmp_path, sig):
    store, n = tmp_path / "store", 3000
    p = subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD.format(root=str(ROOT)), str(store), str(n)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        os.kill(p.pid, sig)
        assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    finally:
        p.kill()
    got = {r.uid for r in query(store, account="sig")}
    assert got == {f"s-{i}" for i in range(n)}
    assert verify_store(store).ok
