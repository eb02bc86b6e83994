"""storage/verify.py: an intact store passes; every kind of tampering fails and names the
day and the batch."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from linewarden import keys
from storage.chain import batch_hash, genesis
from storage.config import StoreConfig
from storage.partitions import day_path
from storage.schema import RowDecoder
from storage.verify import verify_store
from storage.writer import write_records
from tests.storage.conftest import DAYS, NOW, clock, records_for

PER_BATCH = 40


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("template") / "store"
    write_records(d, records_for(DAYS, 20), StoreConfig(batch_max=PER_BATCH), clock=clock)
    return d


@pytest.fixture
def chained(template: Path, tmp_path: Path) -> Path:
    """Three closed days, 160 records each, in batches of 40 (ids 1-40 = batch 0, ...);
    a fresh copy for each test."""
    d = tmp_path / "store"
    shutil.copytree(template, d)
    (d / "keys" / "signing.key").chmod(0o600)
    return d


def problems(store: Path, **kw) -> list[str]:
    return [str(p) for p in verify_store(store, now=NOW, **kw).problems]


def sql(store: Path, day: str, *stmts: str) -> None:
    with sqlite3.connect(day_path(store, day)) as c:
        for s in stmts:
            c.execute(s)


def test_intact_store_passes(chained):
    rep = verify_store(chained, now=NOW)
    assert rep.ok, rep.problems
    assert rep.days == 4 and rep.rows == 3 * 160 + 1  # + the keys.init maintenance record


def test_changed_row_names_day_and_batch(chained):
    sql(chained, DAYS[1], "UPDATE rec SET uid = 'forged' WHERE id = 50")
    assert problems(chained) == [f"{DAYS[1]} batch 1: rows 41-80 changed (hash mismatch)"]


def test_changed_row_with_the_sqlite3_shell(chained):
    if not shutil.which("sqlite3"):
        pytest.skip("sqlite3 shell not installed")
    subprocess.run(["sqlite3", str(day_path(chained, DAYS[2])), "UPDATE rec SET ts = ts + 1 WHERE id = 121;"], check=True)
    assert problems(chained) == [f"{DAYS[2]} batch 3: rows 121-160 changed (hash mismatch)"]


def test_changed_action_and_interned_string(chained):
    sql(chained, DAYS[0], "UPDATE rec SET action = 0 WHERE action = 1 AND id < 40")
    assert problems(chained) == [f"{DAYS[0]} batch 0: rows 1-40 changed (hash mismatch)"]


def test_changed_interned_account_fails_every_batch_using_it(chained):
    sql(chained, DAYS[0], "UPDATE strs SET v = 'someone-else' WHERE v = 'user3'")
    out = problems(chained)
    assert out and all(p.startswith(f"{DAYS[0]} batch ") and "changed" in p for p in out)


def test_deleted_row(chained):
    sql(chained, DAYS[1], "DELETE FROM rec WHERE id = 90")
    assert problems(chained) == [f"{DAYS[1]} batch 2: 1 row(s) deleted (ids 90)"]


def test_inserted_row_after_the_last_batch(chained):
    sql(chained, DAYS[1], "INSERT INTO rec SELECT 161, kind, ts, 'new', account, client_ip, client_port, client_mac, "
        "nat_ip, nat_port, server_ip, server_port, action, rule_ids, ruleset_version, community_id, domain, x FROM rec WHERE id = 5")
    out = problems(chained)
    assert len(out) == 1 and out[0].startswith(f"{DAYS[1]} batch 3: 1 row(s) after the last batch") and "inserted" in out[0]


def test_replaced_row_content(chained):
    cols = "kind, ts, uid, account, client_ip, client_port, client_mac, nat_ip, nat_port, server_ip, server_port, action, rule_ids, ruleset_version, community_id, domain, x"
    sql(chained, DAYS[0], "DELETE FROM rec WHERE id = 10", f"INSERT INTO rec(id, {cols}) SELECT 10, {cols} FROM rec WHERE id = 11")
    assert problems(chained) == [f"{DAYS[0]} batch 0: rows 1-40 changed (hash mismatch)"]


def test_deleted_day_file(chained):
    day_path(chained, DAYS[1]).unlink()
    out = problems(chained)
    assert out == [f"{DAYS[1]} batch 3: day file is missing (the digest log has its signed head)"]


def test_day_file_replaced_by_another_days_file(chained):
    shutil.copy(day_path(chained, DAYS[0]), day_path(chained, DAYS[1]))
    out = problems(chained)
    assert any(p.startswith(DAYS[1]) and "belongs to day '2026-01-05'" in p for p in out)


def test_truncated_chain(chained):
    sql(chained, DAYS[2], "DELETE FROM rec WHERE id > 120", "DELETE FROM batches WHERE n = 3")
    assert problems(chained) == [f"{DAYS[2]} batch 3: chain truncated: the file ends at batch 2, the digest log signed batch 3"]


def test_rechained_file_is_caught_by_the_signature(chained):
    """Someone edits a row and recomputes every batch hash: the chain is consistent again,
    but the signed head in the digest log no longer matches."""
    p = day_path(chained, DAYS[0])
    sql(chained, DAYS[0], "UPDATE rec SET uid = 'forged' WHERE id = 3")
    with sqlite3.connect(p) as c:
        dec = RowDecoder(c)
        prev = genesis(DAYS[0])
        for n, first, last in c.execute("SELECT n, first_id, last_id FROM batches ORDER BY n").fetchall():
            rows = c.execute("SELECT * FROM rec WHERE id BETWEEN ? AND ? ORDER BY id", (first, last)).fetchall()
            prev, _ = batch_hash(prev, n, first, [dec.logical(r) for r in rows])
            c.execute("UPDATE batches SET hash = ? WHERE n = ?", (prev, n))
    assert problems(chained) == [f"{DAYS[0]} batch 3: chain head does not match the signed digest (day file replaced or re-chained)"]


def test_batches_appended_after_close(chained):
    p = day_path(chained, DAYS[0])
    with sqlite3.connect(p) as c:
        n, last, h = c.execute("SELECT n, last_id, hash FROM batches ORDER BY n DESC LIMIT 1").fetchone()
        row = c.execute("SELECT * FROM rec WHERE id = 1").fetchone()
        c.execute(f"INSERT INTO rec VALUES ({','.join('?' * len(row))})", (last + 1, *row[1:]))
        dec = RowDecoder(c)
        new, _ = batch_hash(bytes(h), n + 1, last + 1, [dec.logical(row)])
        c.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)", (n + 1, last + 1, last + 1, row[2], row[2], new))
    assert problems(chained) == [f"{DAYS[0]} batch 4: 1 batch(es) appended after the day was closed and signed"]


def test_digest_log_line_removed(chained):
    log = chained / "digests.log"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:1] + lines[2:]))
    out = problems(chained)
    assert any("previous-line hash does not match" in p for p in out)


def test_digest_log_entry_altered(chained):
    log = chained / "digests.log"
    lines = log.read_text().splitlines()
    e = json.loads(lines[-1])
    e["batch"] = 2
    lines[-1] = json.dumps(e, separators=(",", ":"))
    log.write_text("\n".join(lines) + "\n")
    assert any("bad signature" in p for p in problems(chained))


def test_foreign_public_key_rejects_every_signature(chained, tmp_path):
    other = keys.generate(tmp_path / "other")
    out = problems(chained, public_key=tmp_path / "other")
    assert out and all("bad signature" in p for p in out)
    assert other.fingerprint


def test_single_day(chained):
    sql(chained, DAYS[1], "DELETE FROM rec WHERE id = 1")
    assert problems(chained, days=[DAYS[0]]) == []
    assert problems(chained, days=[DAYS[1]]) == [f"{DAYS[1]} batch 0: 1 row(s) deleted (ids 1)"]


def test_unsigned_day_that_is_over_fails(chained):
    shutil.copy(day_path(chained, DAYS[0]), chained / "2026-01-04.sqlite")
    out = problems(chained)
    assert any(p.startswith("2026-01-04") for p in out)
