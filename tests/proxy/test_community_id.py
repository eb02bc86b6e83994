"""Tests for proxy/community_id.py against the spec's reference values."""

from __future__ import annotations

import ipaddress
import random

import pytest

from proxy.community_id import community_id


@pytest.mark.parametrize(
    ("proto", "src", "dst", "sport", "dport", "expected"),
    [
        # corelight/community-id-spec baseline values
        (6, "128.232.110.120", "66.35.250.204", 34855, 80, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
        (17, "192.168.1.52", "8.8.8.8", 54585, 53, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
        (6, "2001:470:e5bf:dead:4957:2174:e82c:4887", "2607:f8b0:400c:c03::1a", 63943, 25,
         "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
        (132, "192.168.170.8", "192.168.170.56", 7, 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="),
        (1, "192.168.0.89", "192.168.0.1", 8, 0, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="),
        (58, "3ffe:507:0:1:200:86ff:fe05:80da", "3ffe:501:0:1001::2", 128, 0, "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg="),
    ],
)
def test_reference_vectors_both_directions(proto: int, src: str, dst: str, sport: int, dport: int, expected: str) -> None:
    assert community_id(proto, src, dst, sport, dport) == expected
    if proto in (6, 17, 132):
        assert community_id(proto, dst, src, dport, sport) == expected


def test_packed_addresses_give_the_same_id() -> None:
    a, b = ipaddress.ip_address("128.232.110.120").packed, ipaddress.ip_address("66.35.250.204").packed
    assert community_id(6, a, b, 34855, 80) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


def test_seed_changes_the_id() -> None:
    assert community_id(6, "128.232.110.120", "66.35.250.204", 34855, 80, seed=1) != "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


def test_mixed_ip_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="same IP version"):
        community_id(6, "192.0.2.1", "2001:db8::1", 1, 2)


def test_agrees_with_the_store_so_its_space_saving_marker_applies() -> None:
    # storage/ recomputes the ID from a record's 5-tuple; ours must be the same string.
    store = pytest.importorskip("storage.communityid")
    rnd = random.Random(7)
    for _ in range(200):
        make = ipaddress.IPv6Address if rnd.random() < 0.5 else ipaddress.IPv4Address
        bits = 128 if make is ipaddress.IPv6Address else 32
        a, b = str(make(rnd.getrandbits(bits))), str(make(rnd.getrandbits(bits)))
        sp, dp, proto = rnd.randrange(65536), rnd.randrange(65536), rnd.choice([6, 17])
        assert community_id(proto, a, b, sp, dp) == store.community_id(proto, a, sp, b, dp)
