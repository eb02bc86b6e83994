"""`linewarden ca` (linewarden/commands/ca.py, proxy/tls_ca.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from linewarden.cli import main
from proxy.tls_ca import CERT_FILE, KEY_FILE, CaError, init_ca, load_ca


def test_init_creates_private_key_and_exports_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    out = tmp_path / "client.pem"
    assert main(["ca", "init", "--dir", str(d), "--org", "Test School", "--export", str(out)]) == 0
    key = d / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"PRIVATE KEY" not in out.read_bytes()
    assert b"PRIVATE KEY" not in (d / CERT_FILE).read_bytes()
    printed = capsys.readouterr().out
    assert load_ca(d).fingerprint_sha256 in printed
    assert "Test School" in printed


def test_init_refuses_to_replace_without_force(tmp_path: Path) -> None:
    first = init_ca(tmp_path)
    assert main(["ca", "init", "--dir", str(tmp_path)]) == 1
    assert load_ca(tmp_path).fingerprint_sha256 == first.fingerprint_sha256
    assert main(["ca", "init", "--dir", str(tmp_path), "--force"]) == 0
    assert load_ca(tmp_path).fingerprint_sha256 != first.fingerprint_sha256


def test_load_refuses_a_readable_key(tmp_path: Path) -> None:
    init_ca(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    with pytest.raises(CaError, match="0600"):
        load_ca(tmp_path)


def test_show_without_ca_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "show", "--dir", str(tmp_path / "none")]) == 1
    assert "ca init" in capsys.readouterr().err


def test_mitmproxy_loads_the_ca_from_its_confdir(tmp_path: Path) -> None:
    from mitmproxy.certs import CertStore

    ca = init_ca(tmp_path)
    store = CertStore.from_store(tmp_path, "mitmproxy", 2048)
    assert store.default_ca.fingerprint().hex(":").upper() == ca.fingerprint_sha256
    leaf = store.get_cert("www.example.org", [])
    assert leaf.cert.issuer == store.default_ca.issuer
