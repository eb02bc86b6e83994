"""The appliance's Ed25519 key pair: generate, load, sign, verify.

Signs the daily chain heads of the audit store (storage/chain.py) and, later, rule
bundles. The private key file is created with mode 0600 and refused when group or
others can read it (as ssh does). Must not log or print the private key.

Layout of a key directory: ``signing.key`` (PKCS#8 PEM, 0600) and ``signing.pub``
(SubjectPublicKeyInfo PEM, 0644).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rules.errors import LinewardenError

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
DEFAULT_KEY_DIR = "var/keys"
"""Default of ``linewarden keys init --dir``: where the writer of the default store
(./var, StoreConfig.key_dir=None -> <store>/keys) looks for its key."""


class KeyProblem(LinewardenError):
    """A key is missing, unreadable, too widely readable, or of the wrong type."""




def fingerprint(public: Ed25519PublicKey) -> str:
    """Short, stable name of a public key: ``ed25519:`` + 16 hex digits of its SHA-256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class KeyPair:
    private: Ed25519PrivateKey
    public: Ed25519PublicKey

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign(self, data: bytes) -> str:
        """Base64 Ed25519 signature of ``data``."""
        return base64.b64encode(self.private.sign(data)).decode()


def generate(key_dir: str | os.PathLike[str], *, force: bool = False) -> KeyPair:
    """Create a new key pair in ``key_dir``; refuses to overwrite one unless ``force``."""
    d = Path(key_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv_path, pub_path = d / PRIVATE_NAME, d / PUBLIC_NAME
    if priv_path.exists() and not force:
        raise KeyProblem(f"{priv_path} exists; refusing to replace the appliance key (use --force)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = priv_path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    # O_EXCL + mode: the key is never, even briefly, readable by others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, priv_path)
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path.write_bytes(pub_pem)
    os.chmod(pub_path, 0o644)
    return KeyPair(private, private.public_key())


def load(key_dir: str | os.PathLike[str]) -> KeyPair:
    """Load the key pair of ``key_dir``; refuses a private key readable by group or others."""
    priv_path = Path(key_dir) / PRIVATE_NAME
    try:
        st = priv_path.stat()
    except FileNotFoundError:
        raise KeyProblem(f"no signing key at {priv_path} (run `linewarden keys init --dir {key_dir}`)") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyProblem(f"{priv_path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600")
    private = serialization.load_pem_private_key(priv_path.read_bytes(), password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyProblem(f"{priv_path} is not an Ed25519 private key")
    return KeyPair(private, private.public_key())


def load_or_generate(key_dir: str | os.PathLike[str]) -> tuple[KeyPair, bool]:
    """The key pair of ``key_dir``, generated when absent (defaults that run). (pair, created)."""
    if (Path(key_dir) / PRIVATE_NAME).exists():
        return load(key_dir), False
    return generate(key_dir), True


def load_public(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """A public key from a PEM file, or from the ``signing.pub`` of a key directory."""
    p = Path(path)
    if p.is_dir():
        p = p / PUBLIC_NAME
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except FileNotFoundError:
        raise KeyProblem(f"no public key at {p}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyProblem(f"{p} is not an Ed25519 public key")
    return key


def verify(public: Ed25519PublicKey, signature_b64: str, data: bytes) -> bool:
    """True when ``signature_b64`` is ``public``'s signature of ``data``."""
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError):
        return False
    return True
