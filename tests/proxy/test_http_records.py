"""Record builders (proxy/http_records.py): ids, versions, and each record's fields."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import http_records
from proxy.http_records import (ConnInfo, conn_record, evidence, highest_version, http_record, new_uid,
                                 tls_record)
from rules.verdict import Match, Verdict, combine_action
from storage.communityid import community_id
from storage.records import Conn, Http, Tls


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


# -- the records: every field where it belongs ------------------------------------------------

ADDRS = st.sampled_from(["10.0.0.7", "192.0.2.1", "2001:db8::5", "::1", None])
TEXT = st.one_of(st.none(), st.text(max_size=12))
PORTS = st.one_of(st.none(), st.integers(0, 65535))


@st.composite
def conn_infos(draw: st.DrawFn) -> ConnInfo:
    return ConnInfo(
        uid=new_uid(), ts=draw(st.integers(0, 2**53)), client_ip=draw(ADDRS) or "10.0.0.1",
        client_port=draw(st.integers(0, 65535)), server_ip=draw(ADDRS), server_port=draw(PORTS),
        nat_ip=draw(ADDRS), nat_port=draw(PORTS), account=draw(TEXT), client_mac=draw(TEXT), dns_name=draw(TEXT),
    )


def verdict(rules: list[tuple[str, str]], version: int) -> Verdict:
    matches = tuple(Match(r, "gambling", "domain", "x.example", a, "sni", "snip " + r) for r, a in rules)  # type: ignore[arg-type]
    return Verdict(combine_action(matches), matches, version)


VERDICTS = st.builds(
    verdict,
    st.lists(st.tuples(st.sampled_from(["R1", "R2", "R3"]), st.sampled_from(["block", "log"])),
             max_size=3, unique_by=lambda t: t[0]),
    st.integers(0, 5),
)


def flow_id(c: ConnInfo) -> str | None:
    """What the Community ID of ``c`` is: none until the server is known, none across families."""
    if not (c.server_ip and c.server_port):
        return None
    try:
        return community_id(6, c.client_ip, c.client_port, c.server_ip, c.server_port)
    except ValueError:
        return None


def connection_fields(c: ConnInfo) -> dict[str, object]:
    """The fields every record of ``c`` carries (DESIGN.md "Records"), written out."""
    return {"uid": c.uid, "account": c.account, "client_ip": c.client_ip, "client_port": c.client_port,
            "client_mac": c.client_mac, "nat_ip": c.nat_ip, "nat_port": c.nat_port, "server_ip": c.server_ip,
            "server_port": c.server_port, "community_id": flow_id(c)}


@settings(max_examples=200, deadline=None)
@given(conn_infos(), VERDICTS, TEXT, st.lists(st.text(max_size=5), max_size=3),
       st.lists(st.sampled_from(["TLSv1.2", "TLSv1.3", "0x7f1c"]), max_size=3), st.booleans(), st.integers(0, 2**53))
def test_tls_record_fields(c: ConnInfo, v: Verdict, sni: str | None, alpn: list[str], versions: list[str],
                           intercepted: bool, ts: int) -> None:
    got = tls_record(c, ts, sni=sni, alpn=alpn, versions=versions, verdict=v, intercepted=intercepted)
    assert got == Tls(ts=ts, **connection_fields(c), action=v.action, rule_ids=list(v.rule_ids),  # type: ignore[arg-type]
                      ruleset_version=v.ruleset_version or None, sni=sni, alpn=alpn,
                      tls_version=highest_version(versions), intercepted=intercepted)


@settings(max_examples=200, deadline=None)
@given(conn_infos(), st.sampled_from(["tls", "http", None]), st.integers(0, 2**40), st.integers(0, 2**40),
       st.sampled_from(["fin", "rst", "blocked", "error: x"]), st.sampled_from(["allow", "block", "log"]),
       st.lists(st.sampled_from(["R1", "R2"]), unique=True), st.one_of(st.none(), st.integers(0, 5)))
def test_conn_record_fields(c: ConnInfo, service: str | None, up: int, down: int, reason: str, action: str,
                            rule_ids: list[str], version: int | None) -> None:
    got = conn_record(c, c.ts + 5, service=service, bytes_up=up, bytes_down=down, close_reason=reason,
                      action=action, rule_ids=rule_ids, ruleset_version=version)
    assert got == Conn(ts=c.ts, **connection_fields(c), action=action, rule_ids=rule_ids,  # type: ignore[arg-type]
                       ruleset_version=version, proto="tcp", service=service, ts_end=c.ts + 5, bytes_up=up,
                       bytes_down=down, close_reason=reason, dns_name=c.dns_name)


@settings(max_examples=100, deadline=None)
@given(conn_infos(), VERDICTS, st.integers(0, 2**53))
def test_http_record_fields(c: ConnInfo, v: Verdict, ts: int) -> None:
    got = http_record(c, ts, method="POST", url="http://x.example/a", host="x.example",
                      req_headers=[(b"User-Agent", b"ua"), (b"Referer", b"r")], status=200,
                      resp_headers=[(b"Content-Type", b"text/html")], req_bytes=3, resp_bytes=4, verdict=v)
    first = v.matches[0] if v.matches else None
    assert got == Http(ts=ts, **connection_fields(c), action=v.action, rule_ids=list(v.rule_ids),  # type: ignore[arg-type]
                       ruleset_version=v.ruleset_version or None, method="POST", host="x.example",
                       url="http://x.example/a", status=200, content_type="text/html", req_bytes=3, resp_bytes=4,
                       user_agent="ua", referrer="r", category=first.category if first else None,
                       keyword=first.pattern if first else None, snippet=first.snippet if first else None,
                       evidence=evidence(v) if v.action == "block" else None)


def test_community_id_follows_the_server() -> None:
    c = ConnInfo(uid="C1", ts=1, client_ip="10.0.0.1", client_port=5000)
    assert c.community_id() is None
    c.server_ip, c.server_port = "192.0.2.1", 443
    assert c.community_id() == community_id(6, "10.0.0.1", 5000, "192.0.2.1", 443)
    c.server_ip = "2001:db8::1"  # another family than the client's: no flow hash
    assert c.community_id() is None
