"""proxy/identity.py: static ip → account (and MAC) bindings."""

from __future__ import annotations

import pytest

from proxy.identity import Identity, parse_binding

BINDINGS = [
    {"ip": "10.0.0.23", "account": "alice", "mac": "02:00:00:00:00:17"},
    {"ip": "10.0.1.0/24", "account": "lab-1"},
    {"ip": "10.0.0.0/16", "account": "staff"},
    {"ip": "10.0.1.7", "account": "teacher", "mac": "02-00-00-00-01-07"},
    {"ip": "2001:db8::/64", "account": "v6-lab"},
]


@pytest.fixture
def ident() -> Identity:
    return Identity.from_config(BINDINGS)


@pytest.mark.parametrize(
    "ip, account, mac",
    [
        ("10.0.0.23", "alice", "02:00:00:00:00:17"),
        ("10.0.1.7", "teacher", "02:00:00:00:01:07"),   # exact beats the /24
        ("10.0.1.8", "lab-1", None),                    # /24 beats the /16
        ("10.0.9.9", "staff", None),
        ("2001:db8::5", "v6-lab", None),
        ("::ffff:10.0.0.23", "alice", "02:00:00:00:00:17"),  # v4-mapped (dual-stack socket)
        ("192.0.2.1", None, None),
        ("not-an-ip", None, None),
    ],
)
def test_lookup(ident: Identity, ip: str, account: str | None, mac: str | None) -> None:
    assert ident.account_for(ip) == account
    assert ident.mac_for(ip) == mac


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"account": "a"}, "'ip' must be"),
        ({"ip": "10.0.0.300", "account": "a"}, "is not an address or network"),
        ({"ip": "10.0.0.1/24", "account": "a"}, "is not an address or network"),  # host bits set
        ({"ip": "10.0.0.1", "account": ""}, "'account' must be a non-empty string"),
        ({"ip": "10.0.0.1", "account": "a", "mac": "zz"}, "is not like"),
        ({"ip": "10.0.0.1", "account": "a", "user": "x"}, "unknown key(s) user"),
    ],
)
def test_bad_bindings_say_what_is_wrong(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_binding(entry)


def test_from_config_names_the_entry_and_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match=r"identity.binding\[1\]"):
        Identity.from_config([{"ip": "10.0.0.1", "account": "a"}, {"ip": "x", "account": "b"}])
    with pytest.raises(ValueError, match="bound twice"):
        Identity.from_config([{"ip": "10.0.0.1", "account": "a"}, {"ip": "10.0.0.1", "account": "b"}])


def test_empty_identity_knows_nobody() -> None:
    assert Identity().account_for("10.0.0.1") is None and len(Identity()) == 0


def test_v4_mapped_matches_exact_binding_without_networks() -> None:
    ident = Identity.from_config([{"ip": "10.0.0.5", "account": "bob"}])
    assert ident.account_for("::ffff:10.0.0.5") == "bob"
    assert ident.account_for("10.0.0.6") is None
