"""linewarden/keys.py: Ed25519 key pair, 0600 private key, sign and verify."""

from __future__ import annotations

import os
import stat

import pytest

from linewarden import keys


def test_generate_writes_0600_private_key_and_signs(tmp_path):
    pair = keys.generate(tmp_path / "k")
    mode = stat.S_IMODE(os.stat(tmp_path / "k" / keys.PRIVATE_NAME).st_mode)
    assert mode == 0o600
    sig = pair.sign(b"chain head")
    assert keys.verify(keys.load_public(tmp_path / "k"), sig, b"chain head")
    assert not keys.verify(pair.public, sig, b"another head")
    assert keys.load(tmp_path / "k").fingerprint == pair.fingerprint


def test_refuses_to_replace_a_key_without_force(tmp_path):
    a = keys.generate(tmp_path)
    with pytest.raises(keys.KeyProblem, match="refusing to replace"):
        keys.generate(tmp_path)
    assert keys.generate(tmp_path, force=True).fingerprint != a.fingerprint


def test_refuses_a_private_key_others_can_read(tmp_path):
    keys.generate(tmp_path)
    os.chmod(tmp_path / keys.PRIVATE_NAME, 0o644)
    with pytest.raises(keys.KeyProblem, match="must be 0600"):
        keys.load(tmp_path)


def test_missing_key_says_how_to_make_one(tmp_path):
    with pytest.raises(keys.KeyProblem, match="linewarden keys init"):
        keys.load(tmp_path)
    assert keys.verify(keys.generate(tmp_path).public, "not base64!", b"x") is False
