"""Signed bundles (rules/bundle.py): pack, verify, and every way a bundle is refused."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from linewarden import keys
from rules import bundle as B
from rules.bundle import BundleError, pack, verify_bundle

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
TOML = 'name = "site"\nversion = 5\n\n[categories.ads]\naction = "block"\n'
DOMAINS = "id\tcategory\tdomain\nD1\tads\tads.test\n"


@pytest.fixture
def rs(tmp_path: Path) -> Path:
    d = tmp_path / "rs"
    d.mkdir()
    (d / "ruleset.toml").write_text(TOML)
    (d / "domains.tsv").write_text(DOMAINS)
    return d


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> keys.KeyPair:
    return keys.generate(tmp_path_factory.mktemp("keys"))


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


def write_tar(path: Path, items: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in items:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def regular(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def resign(path: Path, pair: keys.KeyPair, files: dict[str, bytes], manifest: dict | None = None) -> None:
    """A correctly signed bundle of arbitrary content."""
    m = manifest or {"format": "linewarden-rules", "format_version": 1, "name": "site", "version": 5,
                     "created": "2026-11-28T12:00:00Z",
                     "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    body = json.dumps(m).encode()
    sig = json.dumps({"key": pair.fingerprint, "signature": pair.sign(body)}).encode()
    write_tar(path, [(regular("manifest.json"), body), (regular("manifest.sig"), sig)]
              + [(regular(f"rules/{n}"), d) for n, d in files.items()])


def test_pack_then_verify(tmp_path: Path, rs: Path, pair: keys.KeyPair) -> None:
    out = tmp_path / "b.lwb"
    manifest = pack(rs, out, pair, now=NOW)
    assert manifest["files"] == {"ruleset.toml": hashlib.sha256(TOML.encode()).hexdigest(),
                                 "domains.tsv": hashlib.sha256(DOMAINS.encode()).hexdigest()}
    assert (manifest["name"], manifest["version"], manifest["created"]) == ("site", 5, "2026-11-28T12:00:00Z")
    assert set(members(out)) == {"manifest.json", "manifest.sig", "rules/ruleset.toml", "rules/domains.tsv"}
    b = verify_bundle(out, [pair.public], tmp_path / "u", running_version=4)
    assert (b.name, b.version, b.key) == ("site", 5, pair.fingerprint)
    assert (b.dir / "rules" / "domains.tsv").read_text() == DOMAINS


def test_pack_refuses_an_invalid_rule_set(tmp_path: Path, rs: Path, pair: keys.KeyPair) -> None:
    (rs / "domains.tsv").write_text(DOMAINS + "D2\tnope\tx.test\n")
    with pytest.raises(BundleError, match="unknown category 'nope'"):
        pack(rs, tmp_path / "b", pair, now=NOW)
    assert not (tmp_path / "b").exists()


def refusal(tmp_path: Path, path: Path, pubs: list, **kw: object) -> str:
    with pytest.raises(BundleError) as e:
        verify_bundle(path, pubs, tmp_path / "u", **kw)  # type: ignore[arg-type]
    return str(e.value)


def test_untrusted_key_is_refused(tmp_path: Path, rs: Path, pair: keys.KeyPair) -> None:
    out = tmp_path / "b"
    pack(rs, out, pair, now=NOW)
    other = keys.generate(tmp_path / "other")
    assert "bad signature" in refusal(tmp_path / "1", out, [other.public])
    assert "trusted: none configured" in refusal(tmp_path / "2", out, [])


def test_one_of_several_trusted_keys_is_enough(tmp_path: Path, rs: Path, pair: keys.KeyPair) -> None:
    out = tmp_path / "b"
    pack(rs, out, pair, now=NOW)
    other = keys.generate(tmp_path / "other")
    assert verify_bundle(out, [other.public, pair.public], tmp_path / "u").key == pair.fingerprint


def test_a_file_altered_after_signing_is_refused(tmp_path: Path, rs: Path, pair: keys.KeyPair) -> None:
    out = tmp_path / "b"
    pack(rs, out, pair, now=NOW)
    m = members(out)
    m["rules/domains.tsv"] += b"D2\tads\tevil.test\n"
    write_tar(out, [(regular(n), d) for n, d in m.items()])
    assert "domains.tsv: SHA-256 does not match the manifest" in refusal(tmp_path, out, [pair.public])


def test_an_altered_manifest_breaks_the_signature(tmp_path: Path, rs: Path, pair: keys.KeyPair) -> None:
    out = tmp_path / "b"
    pack(rs, out, pair, now=NOW)
    m = members(out)
    m["manifest.json"] = m["manifest.json"].replace(b'"version": 5', b'"version": 6')
    write_tar(out, [(regular(n), d) for n, d in m.items()])
    assert "bad signature" in refusal(tmp_path, out, [pair.public])


def test_missing_and_extra_files(tmp_path: Path, pair: keys.KeyPair) -> None:
    files = {"ruleset.toml": TOML.encode(), "domains.tsv": DOMAINS.encode()}
    m = {"format": "linewarden-rules", "format_version": 1, "name": "site", "version": 5,
         "created": "x", "files": {"ruleset.toml": hashlib.sha256(TOML.encode()).hexdigest(),
                                   "urls.tsv": "0" * 64}}
    resign(tmp_path / "b", pair, files, m)
    text = refusal(tmp_path, tmp_path / "b", [pair.public])
    assert "urls.tsv: listed in the manifest but missing" in text
    assert "domains.tsv: in the bundle but not in the manifest" in text


def test_a_signed_but_invalid_rule_set_is_refused(tmp_path: Path, pair: keys.KeyPair) -> None:
    resign(tmp_path / "b", pair, {"ruleset.toml": TOML.encode(),
                                  "domains.tsv": (DOMAINS + "broken\n").encode()})
    assert "invalid rule set: domains.tsv:3: 1 columns, expected 3" in refusal(tmp_path, tmp_path / "b", [pair.public])


def test_manifest_and_ruleset_must_agree(tmp_path: Path, pair: keys.KeyPair) -> None:
    files = {"ruleset.toml": TOML.encode()}
    m = {"format": "linewarden-rules", "format_version": 1, "name": "site", "version": 9,
         "created": "x", "files": {"ruleset.toml": hashlib.sha256(TOML.encode()).hexdigest()}}
    resign(tmp_path / "b", pair, files, m)
    assert "ruleset.toml says site v5, the manifest site v9" in refusal(tmp_path, tmp_path / "b", [pair.public])


def test_versions_must_grow_unless_downgrade_is_allowed(tmp_path: Path, rs: Path, pair: keys.KeyPair) -> None:
    out = tmp_path / "b"
    pack(rs, out, pair, now=NOW)
    for running in (5, 6):
        assert "is not higher than the running version" in refusal(
            tmp_path / str(running), out, [pair.public], running_version=running)
    assert verify_bundle(out, [pair.public], tmp_path / "d", running_version=6, allow_downgrade=True).version == 5


@pytest.mark.parametrize("name, reason", [
    ("../evil.tsv", "unexpected member '../evil.tsv'"),
    ("/etc/passwd", "unexpected member '/etc/passwd'"),
    ("rules/../../x", "unexpected member 'rules/../../x'"),
    ("rules/notes.txt", "unexpected member 'rules/notes.txt'"),
])
def test_path_traversal_and_unknown_members_are_refused(tmp_path: Path, name: str, reason: str) -> None:
    write_tar(tmp_path / "b", [(regular(name), b"x")])
    assert reason in refusal(tmp_path, tmp_path / "b", [])
    assert not (tmp_path / "evil.tsv").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_links_and_directories_are_refused(tmp_path: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("rules/domains.tsv")
    info.type = kind
    info.linkname = "/etc/passwd"
    write_tar(tmp_path / "b", [(info, b"")])
    assert "is not a regular file" in refusal(tmp_path, tmp_path / "b", [])


def test_size_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tar(tmp_path / "b", [(regular("rules/domains.tsv"), b"x" * 5000)])
    monkeypatch.setattr(B, "MAX_FILE_BYTES", 4096)
    assert "member rules/domains.tsv is 5000 bytes; at most 4096" in refusal(tmp_path / "1", tmp_path / "b", [])
    monkeypatch.setattr(B, "MAX_BUNDLE_BYTES", 10)
    assert "at most 10 are accepted" in refusal(tmp_path / "2", tmp_path / "b", [])


def test_garbage_and_unsigned_bundles(tmp_path: Path) -> None:
    (tmp_path / "g").write_bytes(b"not a tar")
    assert "not a readable bundle" in refusal(tmp_path / "1", tmp_path / "g", [])
    write_tar(tmp_path / "u", [(regular("rules/ruleset.toml"), TOML.encode())])
    assert "not a signed bundle" in refusal(tmp_path / "2", tmp_path / "u", [])


def test_cli_pack_and_verify(tmp_path: Path, rs: Path) -> None:
    def lw(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "linewarden", *a], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    assert lw("keys", "init", "--dir", str(tmp_path / "k")).returncode == 0
    p = lw("rules", "pack", str(rs), "--key", str(tmp_path / "k"), "-o", str(tmp_path / "b"))
    assert p.returncode == 0 and "site version 5, 2 files, signed by ed25519:" in p.stdout, p.stderr
    p = lw("rules", "verify", str(tmp_path / "b"), "--pubkey", str(tmp_path / "k" / "signing.pub"))
    assert p.returncode == 0 and "OK: site version 5" in p.stdout
    p = lw("rules", "verify", str(tmp_path / "b"), "--pubkey", str(tmp_path / "k"), "--running-version", "5")
    assert p.returncode == 2 and "not higher than the running version 5" in p.stderr
