"""storage/communityid.py against the spec's own test vectors (Zeek's baseline)."""

from storage.communityid import community_id


def test_spec_vectors():
    assert community_id("tcp", "1.2.3.4", 1122, "5.6.7.8", 3344) == "1:wCb3OG7yAFWelaUydu0D+125CLM="
    assert community_id("udp", "1.2.3.4", 1122, "5.6.7.8", 3344) == "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg="


def test_direction_does_not_matter():
    assert community_id(6, "5.6.7.8", 3344, "1.2.3.4", 1122) == community_id(6, "1.2.3.4", 1122, "5.6.7.8", 3344)


def test_ipv6_and_seed_change_the_hash():
    a = community_id("tcp", "2001:db8::1", 1, "2001:db8::2", 2)
    assert a.startswith("1:") and a != community_id("tcp", "2001:db8::1", 1, "2001:db8::2", 2, seed=1)
