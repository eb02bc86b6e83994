"""Tests for `linewarden replay` (linewarden/commands/replay.py): output, summary,
bad captures and exit codes, and --store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


import linewarden.commands.replay as replay_command
from linewarden.cli import main  # noqa: E402
from tests.proxy.captures import pcap_bytes  # noqa: E402
from tests.proxy.test_replay import BLOCKED_HOST, busy_capture, corpus_rules_dir, dns_pair, keepalive  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rules(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpus_rules_dir(corpus, tmp_path_factory.mktemp("rules"))


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    p = tmp_path / "good.pcap"
    p.write_bytes(pcap_bytes(keepalive().packets() + dns_pair(BLOCKED_HOST, 77)))
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, list[dict], str]:
    code = main(["replay", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_prints_one_json_line_per_decision_and_a_summary(capsys, rules: Path, good: Path) -> None:  # type: ignore[no-untyped-def]
    code, rows, err = run(capsys, "--rules", rules, good)
    assert code == 0
    assert sorted((r["kind"], r["index"], r["action"]) for r in rows) == [
        ("dns", 0, "block"), ("http", 0, "allow"), ("http", 1, "block"), ("http", 2, "block")]
    assert "replay: " in err and " packets, " in err and " flows, 4 decisions (3 block)" in err and "MB/s" in err
    assert "\r" not in err  # stderr is not a terminal here: no progress bar


def test_corpus_capture_json_lines_join_their_labels(capsys, rules: Path, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    code, rows, err = run(capsys, "--rules", rules, corpus / "pcap" / "capture.pcap")
    assert code == 0
    assert "dns malformed" in err
    by_conn = {(r["client"], r["server"], r["index"]): r["action"] for r in rows if r["kind"] in ("http", "tls")}
    by_dns = {(int(r["client"].rsplit(":", 1)[1]), r["dns_id"], r["qname"]): r["action"]
              for r in rows if r["kind"] == "dns"}
    matched = 0
    for line in (corpus / "pcap" / "labels.jsonl").read_text().splitlines():
        lab = json.loads(line)
        if lab["expect"] == "malformed":
            continue
        key = (lab["client_port"], lab["id"], lab["qname"]) if lab["type"] == "dns" else (
            lab["client"], lab["server"], lab["index"])
        assert (by_dns if lab["type"] == "dns" else by_conn).get(key) == lab["expect"], lab
        matched += 1
    assert matched == 576


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated_mid_record.pcap", "truncated record"),
        ("linktype_80211.pcap", "unsupported linktype 105"),
        ("bad_magic.pcap", "not a pcap or pcapng file"),
        ("empty.pcap", "empty file"),
        ("truncated_global_header.pcap", "truncated pcap global header"),
        ("caplen_huge.pcap", "MAX_RECORD_BYTES"),
    ],
)
def test_bad_capture_gives_a_clear_error_and_keeps_going(capsys, rules: Path, corpus: Path, good: Path,  # type: ignore[no-untyped-def]
                                                         name: str, message: str) -> None:
    code, rows, err = run(capsys, "--rules", rules, corpus / "bad" / "pcap" / name, good)
    assert code == 1
    assert f"{name}: capture: " in err and message in err and "decisions before it were kept" in err
    # The good file after it was still replayed.
    assert len([r for r in rows if r["conn"] == "192.0.2.10:40000-198.51.100.20:80"]) == 3


def test_truncated_capture_keeps_the_decisions_before_the_damage(capsys, rules: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = pcap_bytes(dns_pair(BLOCKED_HOST, 1) + keepalive(mss=1400).packets(t0=1_700_000_001_000_000))
    p = tmp_path / "cut.pcap"
    p.write_bytes(data[:-30])
    code, rows, err = run(capsys, "--rules", rules, p)
    assert code == 1 and "truncated record" in err
    assert [r["qname"] for r in rows if r["kind"] == "dns"] == [BLOCKED_HOST]
    # The connection cut short is still decided from what was read.
    assert [r["url"] for r in rows if r["kind"] == "http"] == ["/a", "/b", "/c"]


@pytest.mark.parametrize("name", ["linktype_linux_sll.pcap", "linktype_raw_ip.pcap"])
def test_corpus_sll_and_raw_ip_captures_are_processed(capsys, rules: Path, corpus: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    code, rows, _ = run(capsys, "--rules", rules, corpus / "bad" / "pcap" / name)
    assert code == 0
    assert [r["kind"] for r in rows] == ["dns"]


def test_missing_file_and_bad_rules(capsys, rules: Path, tmp_path: Path, good: Path) -> None:  # type: ignore[no-untyped-def]
    code, rows, err = run(capsys, "--rules", rules, tmp_path / "nope.pcap", good)
    assert code == 1 and "cannot open" in err and rows
    bad = tmp_path / "badrules"
    bad.mkdir()
    (bad / "keywords.tsv").write_text("id\tcategory\tkeyword\nK1\tnope\t\n", encoding="utf-8")
    code, rows, err = run(capsys, "--rules", bad, good)
    assert code == 2 and rows == [] and "linewarden replay:" in err


def test_store_writes_forensic_records(capsys, rules: Path, good: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import storage.query as query
    store = tmp_path / "store"
    code, rows, err = run(capsys, "--rules", rules, "--store", store, good)
    assert code == 0, err
    assert rows == []  # records go to the store, not stdout
    records = list(query.query(store))
    kinds = sorted(type(r).__name__ for r in records)
    assert kinds.count("Http") == 3 and kinds.count("Dns") == 1 and kinds.count("Conn") == 2
    http = [r for r in records if type(r).__name__ == "Http"]
    assert all(r.ts < 1_800_000_000_000_000 for r in http)  # capture time, not the wall clock
    flows = [r for r in records if type(r).__name__ in ("Http", "Dns", "Conn")]
    assert all(r.community_id and r.community_id.startswith("1:") for r in flows)
    assert sorted(r.action for r in http) == ["allow", "block", "block"]


def test_console_entry_point_runs(rules: Path, good: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "linewarden", "replay", "--rules", str(rules), str(good)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 4


def test_parallel_jobs_give_the_same_decisions(capsys, rules: Path, corpus: Path, good: Path) -> None:  # type: ignore[no-untyped-def]
    files = (corpus / "pcap" / "capture.pcap", corpus / "bad" / "pcap" / "truncated_mid_record.pcap", good)
    code1, rows1, err1 = run(capsys, "--rules", rules, *files)
    code2, rows2, err2 = run(capsys, "--rules", rules, "--jobs", "3", *files)
    assert code1 == code2 == 1
    key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
    assert sorted(map(key, rows1)) == sorted(map(key, rows2))
    assert err2.count("truncated record") == 1  # reported once, not once per worker
    assert "(3 jobs)" in err2
    s1 = err1.split(" in ")[0]
    s2 = err2.split(" in ")[0]
    assert s1 == s2  # same packets, bytes, flows, decisions


def test_parallel_store(capsys, rules: Path, good: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import storage.query as query
    code, _, err = run(capsys, "--rules", rules, "--jobs", "2", "--store", tmp_path / "s", good)
    assert code == 0, err
    kinds = sorted(type(r).__name__ for r in query.query(tmp_path / "s"))
    assert kinds.count("Http") == 3 and kinds.count("Dns") == 1 and kinds.count("Conn") == 2


def test_progress_bar_only_on_a_terminal(rules: Path, corpus: Path) -> None:
    import os

    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "linewarden", "replay", "--rules", str(rules),
                               str(corpus / "pcap" / "capture.pcap")],
                              stdout=subprocess.DEVNULL, stderr=slave, timeout=120, cwd=ROOT)
        os.close(slave)
        slave = -1
        err = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert b"\r[" in err and b"% " in err and b"decisions" in err
    assert b"replay: 3619 packets" in err


def test_output_is_byte_identical_whatever_the_jobs(capsys, rules: Path, corpus: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A capture with flows closed by idle sweeps, unanswered DNS queries, port reuse
    # and timestamps out of order, cut in two files (connections continue across them).
    pkts = busy_capture()
    half = len(pkts) // 2
    (tmp_path / "a.pcap").write_bytes(pcap_bytes(pkts[:half]))
    (tmp_path / "b.pcap").write_bytes(pcap_bytes(pkts[half:]))
    files = (corpus / "pcap" / "capture.pcap", tmp_path / "a.pcap", tmp_path / "b.pcap")
    outputs = {}
    for jobs in ("1", "2", "3"):
        assert main(["replay", "--rules", str(rules), "--jobs", jobs, *map(str, files)]) == 0
        outputs[jobs] = capsys.readouterr()
    monkeypatch.setattr(replay_command, "PARALLEL_MIN_BYTES", 0)
    assert replay_command.default_jobs(list(files)) == replay_command.default_jobs([]) >= 1
    assert main(["replay", "--rules", str(rules), *map(str, files)]) == 0
    outputs["default"] = capsys.readouterr()
    serial = outputs["1"].out
    assert serial.count("\n") > 600
    for jobs, out in outputs.items():
        assert out.out == serial, f"--jobs {jobs}"
        assert out.err.split(" in ")[0] == outputs["1"].err.split(" in ")[0]  # same counts in the summary


def test_small_captures_are_replayed_in_one_process(good: Path) -> None:
    assert replay_command.default_jobs([good]) == 1
