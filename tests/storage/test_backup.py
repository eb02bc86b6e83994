"""storage/backup.py: closed days copied with a SHA-256 manifest; verify; restore."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from storage.backup import MANIFEST, SUMS, backup_restore, backup_run, backup_verify
from storage.partitions import day_path, list_days
from storage.query import query
from storage.verify import verify_store
from tests.storage.conftest import DAYS, NOW


@pytest.fixture
def store(store_copy):
    return store_copy


def test_run_copies_closed_days_only_and_is_incremental(store, tmp_path):
    b = tmp_path / "backup"
    rep = backup_run(store, b)
    assert rep.ok and rep.copied == DAYS  # 2026-01-08 (the clock's day) is still open
    assert (b / MANIFEST).exists() and (b / "digests.log").exists() and (b / "keys" / "signing.pub").exists()
    assert backup_run(store, b).copied == []
    assert backup_run(store, b).skipped == DAYS


def test_manifest_is_sha256sum_compatible(store, tmp_path):
    b = tmp_path / "backup"
    backup_run(store, b)
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", SUMS], cwd=b, check=True)


def test_verify_passes_then_reports_a_changed_or_missing_copy(store, tmp_path):
    b = tmp_path / "backup"
    backup_run(store, b)
    assert backup_verify(b, deep=True).ok
    with open(day_path(b, DAYS[1]), "r+b") as f:
        f.seek(5000)
        f.write(b"\x00tampered")
    day_path(b, DAYS[2]).unlink()
    rep = backup_verify(b)
    assert not rep.ok
    assert any(DAYS[1] in p and "SHA-256 does not match" in p for p in rep.problems)
    assert any(DAYS[2] in p and "missing" in p for p in rep.problems)


def test_restore_a_deleted_day(store, tmp_path):
    b = tmp_path / "backup"
    backup_run(store, b)
    before = [r.uid for r in query(store, since=None)]
    day_path(store, DAYS[0]).unlink()
    assert not verify_store(store, now=NOW).ok
    rep = backup_restore(b, store, days=[DAYS[0]])
    assert rep.ok and rep.copied == [DAYS[0]]
    assert verify_store(store, now=NOW).ok
    assert [r.uid for r in query(store)] == before


def test_restore_refuses_to_overwrite_a_differing_day_unless_forced(store, tmp_path):
    import sqlite3

    b = tmp_path / "backup"
    backup_run(store, b)
    with sqlite3.connect(day_path(store, DAYS[1])) as c:
        c.execute("DELETE FROM rec WHERE id = 1")
        c.execute("DELETE FROM batches")
    rep = backup_restore(b, store, days=[DAYS[1]])
    assert not rep.ok and "not overwritten" in rep.problems[0]
    rep = backup_restore(b, store, days=[DAYS[1]], force=True)
    assert rep.ok and rep.copied == [DAYS[1]]
    assert any(p.name.startswith(f"{DAYS[1]}.sqlite.replaced-") for p in store.iterdir())
    assert verify_store(store, now=NOW).ok


def test_restore_refuses_a_damaged_backup(store, tmp_path):
    b = tmp_path / "backup"
    backup_run(store, b)
    with open(day_path(b, DAYS[0]), "r+b") as f:
        f.seek(4096)
        f.write(b"XXXX")
    target = tmp_path / "fresh"
    rep = backup_restore(b, target)
    assert any("does not match its manifest" in p for p in rep.problems)
    assert list_days(target) == DAYS[1:]


def test_restore_into_an_empty_store_verifies(store, tmp_path):
    b = tmp_path / "backup"
    backup_run(store, b)
    target = tmp_path / "rebuilt"
    assert backup_restore(b, target).ok
    shutil.copytree(b / "keys", target / "keys")
    rep = verify_store(target, now=NOW, days=DAYS)
    assert rep.ok, rep.problems
