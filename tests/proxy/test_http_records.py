"""Record builders' small helpers (proxy/http_records.py)."""

from __future__ import annotations

import os

import pytest

from proxy import http_records
from proxy.http_records import highest_version, new_uid


def _uid_of(bits: int) -> str:
    """The reference: 17 base62 digits of ``bits``, least significant first."""
    out = []
    for _ in range(17):
        bits, r = divmod(bits, 62)
        out.append(http_records._UID_ALPHABET[r])
    return "C" + "".join(out)


@pytest.mark.parametrize("raw", [bytes(13), b"\xff" * 13, bytes(range(13)), os.urandom(13), os.urandom(13)])
def test_uid_is_the_base62_of_101_random_bits(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # The ids come 13 bytes at a time from a pool of urandom bytes: a fresh pool of
    # ``raw`` repeated gives ``raw``'s id each time.
    monkeypatch.setattr(http_records.os, "urandom", lambda n: (raw * (n // 13 + 1))[:n])
    http_records._reset_uid_pool()
    try:
        assert new_uid() == _uid_of(int.from_bytes(raw) >> 3)
        assert new_uid() == _uid_of(int.from_bytes(raw) >> 3)
    finally:
        http_records._reset_uid_pool()


def test_uid_pool_is_refilled_when_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    real_urandom = os.urandom

    def urandom(n: int) -> bytes:
        draws.append(n)
        return real_urandom(n)

    monkeypatch.setattr(http_records.os, "urandom", urandom)
    http_records._reset_uid_pool()
    try:
        uids = {new_uid() for _ in range(http_records.UID_POOL_BYTES // 13 + 1)}
    finally:
        http_records._reset_uid_pool()
    assert draws == [http_records.UID_POOL_BYTES] * 2 and len(uids) == http_records.UID_POOL_BYTES // 13 + 1


def test_uids_differ_and_have_the_zeek_shape() -> None:
    uids = {new_uid() for _ in range(1000)}
    assert len(uids) == 1000
    assert all(len(u) == 18 and u[0] == "C" and u[1:].isalnum() and u.isascii() for u in uids)


@pytest.mark.parametrize(("versions", "highest"), [
    (["TLSv1.3", "TLSv1.2"], "TLSv1.3"), (["TLSv1.2", "TLSv1.3"], "TLSv1.3"), (["TLSv1.0"], "TLSv1.0"),
    (["0x7f1c", "TLSv1.1"], "TLSv1.1"), (["0x7f1c"], "0x7f1c"), ([], None), (["SSLv3", "TLSv1"], "TLSv1"),
])
def test_highest_version(versions: list[str], highest: str | None) -> None:
    assert highest_version(versions) == highest
