"""The unit's interception CA: created once, loaded by the embedded mitmproxy.

Owns: generating the CA key and self-signed certificate with ``cryptography``,
writing them where mitmproxy's ``confdir`` expects them
(``mitmproxy-ca.pem`` = key + certificate, which mitmproxy's CertStore loads),
and exporting the certificate alone for installing on clients.

Must not: sign leaf certificates (mitmproxy does that per SNI), or ever write
the private key readable by anyone but the owner: the key can impersonate
every site to every client that trusts it. It is written 0600 inside a 0700
directory, created with those modes (no window where it is world-readable).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MITM_BASENAME = "mitmproxy"
"""mitmproxy's CONF_BASENAME: it loads ``<confdir>/mitmproxy-ca.pem``."""
KEY_FILE = f"{MITM_BASENAME}-ca.pem"
"""Private key followed by the certificate (mitmproxy's layout); mode 0600."""
CERT_FILE = "linewarden-ca-cert.pem"
"""The certificate alone, PEM, for clients (browsers, OS trust stores)."""
CERT_DER_FILE = "linewarden-ca-cert.cer"
"""The certificate alone, DER, for Android and Windows."""
KEY_BITS = 2048
"""RSA 2048, as mitmproxy's own default: every TLS client still accepts it."""
DEFAULT_DAYS = 3650


class CaError(Exception):
    """The CA directory is missing, incomplete, or would be overwritten."""


@dataclass(frozen=True, slots=True)
class CaFiles:
    directory: Path
    """Point mitmproxy's ``confdir`` here."""
    key_file: Path
    """Key + certificate, mode 0600."""
    cert_file: Path
    """Certificate for clients (PEM)."""
    fingerprint_sha256: str
    """Colon-separated SHA-256 of the certificate, to check what clients installed."""
    subject: str


def init_ca(
    directory: str | os.PathLike[str],
    *,
    organization: str = "linewarden",
    common_name: str | None = None,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> CaFiles:
    """Create the CA in ``directory``; refuse to replace an existing one unless ``force``.

    Replacing the CA breaks every client that trusts the old one, so it is never silent.
    """
    d = Path(directory)
    key_path = d / KEY_FILE
    if key_path.exists() and not force:
        raise CaError(f"{key_path} exists; pass --force to replace the CA (clients must then trust the new one)")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    cert = _self_signed(key, organization, common_name or f"{organization} egress CA", now, days)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(key_path, key_pem + cert_pem, 0o600)
    _write(d / CERT_FILE, cert_pem, 0o644)
    _write(d / CERT_DER_FILE, cert.public_bytes(serialization.Encoding.DER), 0o644)
    return load_ca(d)


def load_ca(directory: str | os.PathLike[str]) -> CaFiles:
    """Check the CA in ``directory`` (present, key private) and describe it."""
    d = Path(directory)
    key_path = d / KEY_FILE
    if not key_path.exists():
        raise CaError(f"no CA in {d}: run `linewarden ca init --dir {d}`")
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CaError(f"{key_path} has mode {mode:o}; the CA key must be 0600")
    raw = key_path.read_bytes()
    serialization.load_pem_private_key(raw, password=None)
    cert = x509.load_pem_x509_certificate(raw[raw.index(b"-----BEGIN CERTIFICATE-----") :])
    fp = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    return CaFiles(d, key_path, d / CERT_FILE, fp, cert.subject.rfc4514_string())


def export_cert(directory: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy the CA certificate (never the key) to ``dest``."""
    ca = load_ca(directory)
    out = Path(dest)
    out.write_bytes(ca.cert_file.read_bytes())
    return out


def _self_signed(
    key: rsa.RSAPrivateKey, org: str, cn: str, now: datetime.datetime, days: int
) -> x509.Certificate:
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Back-dated a day: clients with a slightly slow clock must accept it at once.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create with ``mode`` from the first byte (O_CREAT mode), then enforce it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
