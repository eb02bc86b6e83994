"""The store's commands through linewarden.cli.main: keys, query, export, verify, backup."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest

from linewarden.cli import main
from storage.partitions import day_path
from tests.storage.conftest import DAYS, store_copy, template_store  # noqa: F401 (fixtures)


@pytest.fixture
def store(store_copy):
    return store_copy


def test_keys_init_and_show(tmp_path, capsys):
    assert main(["keys", "init", "--dir", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "signing.key").st_mode) == 0o600
    assert main(["keys", "init", "--dir", str(tmp_path / "k")]) == 1  # never silently replaced
    assert main(["keys", "show", "--dir", str(tmp_path / "k")]) == 0
    assert "ed25519:" in capsys.readouterr().out


def test_query_json_filters(store, capsys):
    assert main(["query", "--store", str(store), "--json", "--account", "user1", "--kind", "dns,tls",
                 "--since", "2026-01-06", "--until", "2026-01-07"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and {x["kind"] for x in lines} == {"dns", "tls"} and all(x["account"] == "user1" for x in lines)


def test_query_table_csv_and_errors(store, capsys):
    assert main(["query", "--store", str(store), "--table", "--domain", "example.org", "--limit", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("time") and len(out) == 3 and "bbs.example.org" in out[1]
    assert main(["query", "--store", str(store), "--csv", "--limit", "1"]) == 0
    assert capsys.readouterr().out.startswith("kind,ts,uid")
    assert main(["query", "--store", str(store), "--since", "someday"]) == 2
    assert main(["query", "--store", str(store / "nope")]) == 1


def test_export_to_file(store, tmp_path, capsys):
    out = tmp_path / "case.jsonl"
    assert main(["export", "--store", str(store), "--since", DAYS[0], "--until", DAYS[1], "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 40
    assert main(["export", "--store", str(store), "--format", "csv", "--action", "block", "--out", str(tmp_path / "b.csv")]) == 0
    assert len((tmp_path / "b.csv").read_text().splitlines()) == 1 + 15


def test_export_with_syslog_to_a_local_listener(store, tmp_path):
    import socket

    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    port = srv.getsockname()[1]
    assert main(["export", "--store", str(store), "--kind", "alarm", "--out", str(tmp_path / "a.jsonl"),
                 "--syslog", f"udp://127.0.0.1:{port}"]) == 0
    got = [srv.recv(65536) for _ in range(15)]
    srv.close()
    assert all(g.startswith(b"<129>1 ") for g in got)


def test_verify_exit_codes(store, capsys):
    assert main(["verify", "--store", str(store)]) == 0
    with sqlite3.connect(day_path(store, DAYS[1])) as c:
        c.execute("UPDATE rec SET uid = 'x' WHERE id = 3")
    assert main(["verify", "--store", str(store), "-q"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {DAYS[1]} batch 0: rows 1-40 changed" in out
    day_path(store, DAYS[2]).unlink()
    assert main(["verify", "--store", str(store), "--day", DAYS[2]]) == 1
    assert f"FAIL {DAYS[2]} batch 0: day file is missing" in capsys.readouterr().out


def test_backup_run_verify_restore(store, tmp_path, capsys):
    b = tmp_path / "b"
    assert main(["backup", "run", "--store", str(store), "--to", str(b)]) == 0
    assert main(["backup", "verify", "--backup", str(b), "--deep"]) == 0
    day_path(store, DAYS[0]).unlink()
    assert main(["backup", "restore", "--backup", str(b), "--store", str(store), "--day", DAYS[0]]) == 0
    assert main(["verify", "--store", str(store)]) == 0
    (b / day_path(b, DAYS[1]).name).write_bytes(b"junk")
    assert main(["backup", "verify", "--backup", str(b)]) == 1
    assert "SHA-256 does not match" in capsys.readouterr().out
