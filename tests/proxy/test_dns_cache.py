"""proxy/dns_cache.py: TTL, LRU bound, RFC 2308 negative caching."""

from __future__ import annotations

from dnslib import QTYPE, RR, SOA, A, DNSHeader, DNSQuestion, DNSRecord

from proxy import dns_fastpath as fp
from proxy.dns_cache import DnsCache


def _info(name: str = "a.test", *, ttl: int = 300, rcode: int = 0, answer: bool = True,
          soa: tuple[int, int] | None = None, tc: bool = False) -> fp.ResponseInfo:
    rec = DNSRecord(DNSHeader(id=1, qr=1, rd=1, ra=1, rcode=rcode, tc=int(tc)),
                    q=DNSQuestion(name, QTYPE.A))
    if answer:
        rec.add_answer(RR(name, QTYPE.A, rdata=A("192.0.2.1"), ttl=ttl))
    if soa is not None:
        soa_ttl, minimum = soa
        rec.add_auth(RR("test", QTYPE.SOA, ttl=soa_ttl,
                        rdata=SOA("ns.test", "admin.test", (1, 2, 3, 4, minimum))))
    return fp.walk_response(bytes(rec.pack()))


def test_positive_answer_lives_for_its_ttl() -> None:
    c = DnsCache(10)
    assert c.put(b"k", _info(ttl=30), ["192.0.2.1"], now=100.0) is not None
    assert c.get(b"k", 129.9) is not None
    assert c.get(b"k", 130.0) is None
    assert len(c) == 0 and c.hits == 1 and c.misses == 1


def test_ttl_zero_is_not_cached_unless_min_ttl_says_so() -> None:
    assert DnsCache(10).put(b"k", _info(ttl=0), [], 0.0) is None
    entry = DnsCache(10, min_ttl=5).put(b"k", _info(ttl=0), [], 0.0)
    assert entry is not None and entry.expires == 5.0


def test_max_ttl_clamps() -> None:
    entry = DnsCache(10, max_ttl=60).put(b"k", _info(ttl=999_999), [], 0.0)
    assert entry is not None and entry.expires == 60.0


def test_nxdomain_with_soa_uses_min_of_soa_ttl_and_minimum() -> None:
    c = DnsCache(10)
    entry = c.put(b"k", _info(rcode=3, answer=False, soa=(600, 45)), [], 0.0)
    assert entry is not None and entry.expires == 45.0 and entry.negative
    entry = c.put(b"k2", _info(rcode=3, answer=False, soa=(30, 600)), [], 0.0)
    assert entry is not None and entry.expires == 30.0


def test_nodata_with_soa_is_cached_negatively_and_capped() -> None:
    c = DnsCache(10, max_negative_ttl=20)
    entry = c.put(b"k", _info(answer=False, soa=(3600, 3600)), [], 0.0)
    assert entry is not None and entry.expires == 20.0


def test_negative_without_soa_servfail_and_truncated_are_not_cached() -> None:
    c = DnsCache(10)
    assert c.put(b"a", _info(rcode=3, answer=False), [], 0.0) is None
    assert c.put(b"b", _info(rcode=2, answer=False, soa=(60, 60)), [], 0.0) is None
    assert c.put(b"c", _info(tc=True), [], 0.0) is None
    assert len(c) == 0


def test_lru_evicts_least_recently_used() -> None:
    c = DnsCache(2)
    c.put(b"a", _info(), [], 0.0)
    c.put(b"b", _info(), [], 0.0)
    assert c.get(b"a", 1.0) is not None  # a is now most recent
    c.put(b"c", _info(), [], 0.0)
    assert c.get(b"b", 1.0) is None and c.get(b"a", 1.0) is not None
    assert c.evictions == 1 and len(c) == 2


def test_size_bound_holds_under_many_inserts() -> None:
    c = DnsCache(100)
    info = _info()
    for i in range(5000):
        c.put(str(i).encode(), info, [], 0.0)
    assert len(c) == 100 and c.evictions == 4900


def test_cache_size_zero_disables() -> None:
    assert DnsCache(0).put(b"k", _info(), [], 0.0) is None
