"""storage/communityid.py against the spec's own test vectors (Zeek's baseline)."""

from __future__ import annotations

import ipaddress

import pytest

from storage.communityid import community_id


def test_spec_vectors():
    assert community_id("tcp", "1.2.3.4", 1122, "5.6.7.8", 3344) == "1:wCb3OG7yAFWelaUydu0D+125CLM="
    assert community_id("udp", "1.2.3.4", 1122, "5.6.7.8", 3344) == "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg="


def test_direction_does_not_matter():
    assert community_id(6, "5.6.7.8", 3344, "1.2.3.4", 1122) == community_id(6, "1.2.3.4", 1122, "5.6.7.8", 3344)


def test_ipv6_and_seed_change_the_hash():
    a = community_id("tcp", "2001:db8::1", 1, "2001:db8::2", 2)
    assert a.startswith("1:") and a != community_id("tcp", "2001:db8::1", 1, "2001:db8::2", 2, seed=1)

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
    assert community_id(proto, src, sport, dst, dport) == expected
    if proto in (6, 17, 132):
        assert community_id(proto, dst, dport, src, sport) == expected


def test_packed_addresses_give_the_same_id() -> None:
    a, b = ipaddress.ip_address("128.232.110.120").packed, ipaddress.ip_address("66.35.250.204").packed
    assert community_id(6, a, 34855, b, 80) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


def test_seed_changes_the_id() -> None:
    assert community_id(6, "128.232.110.120", 34855, "66.35.250.204", 80, seed=1) != "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


def test_mixed_ip_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="same IP version"):
        community_id(6, "192.0.2.1", 1, "2001:db8::1", 2)
