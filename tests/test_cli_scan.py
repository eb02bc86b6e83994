"""`linewarden scan` through the real command line (linewarden/commands/scan.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from linewarden.cli import main

REQUEST = "GET /s?q=%E6%8A%BC%E5%A4%A7%E5%B0%8F HTTP/1.1\r\nHost: a.example\r\n\r\n".encode()
RESPONSE_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
BAD_CHUNK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"


def run_scan(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict]]:
    status = main(["scan", *args])
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines()]


def test_one_json_line_per_file_and_errors_do_not_stop_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = []
    for name, data in (("req.http", REQUEST), ("ok.http", RESPONSE_OK), ("bad.http", BAD_CHUNK)):
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    status, lines = run_scan(["--http", *files], capsys)
    assert status == 0
    assert [line["file"] for line in lines] == files
    assert lines[0]["action"] == "block"
    assert lines[0]["matches"][0]["where"] == "query"
    assert lines[0]["matches"][0]["keyword"] == "押大小"
    assert lines[1]["action"] == "allow" and "error" not in lines[1]
    assert "chunk" in lines[2]["error"]


def test_text_files_are_sniffed_utf8_else_gb18030(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gbk.txt").write_bytes("今天 押 大 小 开奖".encode("gb18030"))
    (tmp_path / "missing.txt").unlink(missing_ok=True)
    status, lines = run_scan(["--text", str(tmp_path / "gbk.txt"), str(tmp_path / "missing.txt")], capsys)
    assert status == 0
    assert lines[0]["action"] == "block"
    assert lines[1]["error"].startswith("cannot read")


def test_a_bad_rule_set_exits_2_and_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ruleset.toml").write_text('name = "x"\nversion = 1\n[categories.a]\naction = "block"\n')
    (tmp_path / "keywords.tsv").write_text("id\tcategory\tkeyword\nK1\tnope\tword\n")
    (tmp_path / "m.http").write_bytes(RESPONSE_OK)
    assert main(["scan", "--rules", str(tmp_path), "--http", str(tmp_path / "m.http")]) == 2
    assert "keywords.tsv:2" in capsys.readouterr().err


def test_no_input_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan"]) == 2


def test_the_installed_command_runs(tmp_path: Path) -> None:
    (tmp_path / "req.http").write_bytes(REQUEST)
    done = subprocess.run([sys.executable, "-m", "linewarden", "scan", "--http", str(tmp_path / "req.http")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["action"] == "block"
