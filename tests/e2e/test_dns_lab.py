"""End to end in network namespaces (deploy/lab.sh): client → gateway (nftables +
``linewarden run``) → dnsmasq in the server namespace, authoritative for lw.test only.

The client asks the server's address directly, and an address where no resolver
exists: nftables on the gateway redirects LAN udp/tcp 53 to the shim either way.
Afterwards the store must hold exactly one correct record per query.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.lab import ROOT, lab_session, ns, wait_for

PY = sys.executable
SERVER_IP = "203.0.113.53"
NOWHERE_IP = "203.0.113.99"  # no resolver there: only the redirect can answer
CLIENT_IP = "198.51.100.10"
SINKHOLE = "198.51.100.1"
SHIM_PORT = 5353

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


RULESET = """name = "e2e-dns"
version = 3

[categories.gambling]
action = "block"

[categories.adult]
action = "block"
"""
DOMAINS = "id\tcategory\tdomain\ng1\tgambling\tcasino.lw.test\ng2\tgambling\tbadcdn.lw.test\na1\tadult\tadult.lw.test\n"

DNSMASQ = """port=53
listen-address={ip}
bind-interfaces
no-resolv
no-hosts
no-poll
local=/lw.test/
local-ttl=300
host-record=www.lw.test,192.0.2.10,2001:db8::10
host-record=casino.lw.test,192.0.2.66
host-record=adult.lw.test,192.0.2.67
host-record=edge.badcdn.lw.test,192.0.2.68
cname=alias.lw.test,www.lw.test
cname=via-bad.lw.test,edge.badcdn.lw.test
"""

CLIENT = r"""
import json, sys
from dnslib import DNSRecord
out = []
for server, name, qtype, tcp in json.loads(sys.argv[1]):
    q = DNSRecord.question(name, qtype)
    try:
        r = DNSRecord.parse(q.send(server, 53, tcp=tcp, timeout=5))
        out.append({"name": name, "qtype": qtype, "tcp": tcp, "id": q.header.id,
                    "rcode": r.header.rcode, "tc": r.header.tc,
                    "answers": [str(x.rdata) for x in r.rr]})
    except Exception as e:
        out.append({"name": name, "qtype": qtype, "tcp": tcp, "error": repr(e)})
print(json.dumps(out))
"""

QUERIES = [
    (SERVER_IP, "www.lw.test", "A", False),
    (SERVER_IP, "www.lw.test", "AAAA", False),
    (NOWHERE_IP, "www.lw.test", "A", False),      # another resolver: caught by the redirect
    (SERVER_IP, "alias.lw.test", "A", True),
    (SERVER_IP, "casino.lw.test", "A", False),
    (SERVER_IP, "adult.lw.test", "A", False),
    (SERVER_IP, "via-bad.lw.test", "A", False),
    (SERVER_IP, "nope.lw.test", "A", False),
    (SERVER_IP, "big.lw.test", "TXT", False),     # truncated over UDP ...
    (SERVER_IP, "big.lw.test", "TXT", True),      # ... and the TCP retry
]


@pytest.fixture
def lab():
    with lab_session("lw", LW_DNS_PORT=str(SHIM_PORT)) as handle:
        yield handle


def test_dns_through_the_gateway(lab, tmp_path: Path) -> None:
    prefix, procs = lab
    # The upstream: dnsmasq, authoritative for lw.test only, never recursing.
    conf = DNSMASQ.format(ip=SERVER_IP) + "".join(
        f'txt-record=big.lw.test,"record-{i:02d}-{"x" * 90}"\n' for i in range(20))
    (tmp_path / "dnsmasq.conf").write_text(conf)
    dnsmasq = subprocess.Popen(ns(prefix, "server") + [
        "dnsmasq", "--keep-in-foreground", f"--conf-file={tmp_path / 'dnsmasq.conf'}",
        "--pid-file=", "--user=root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(dnsmasq)

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "ruleset.toml").write_text(RULESET)
    (rules / "domains.tsv").write_text(DOMAINS)
    store = tmp_path / "store"
    config = tmp_path / "linewarden.toml"
    config.write_text(f"""
[rules]
dir = "{rules}"
[store]
dir = "{store}"
commit_interval_ms = 50
[dns]
listen = "0.0.0.0:{SHIM_PORT}"
upstreams = ["{SERVER_IP}:53"]
workers = 2
[dns.sinkhole]
adult = ["{SINKHOLE}"]
[[identity.binding]]
ip = "{CLIENT_IP}"
account = "alice"
""")
    log = open(tmp_path / "linewarden.log", "wb")
    lw = subprocess.Popen(ns(prefix, "gw") + [PY, "-m", "linewarden", "run", "--config", str(config)],
                          stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    procs.append(lw)
    wait_for(tmp_path / "linewarden.log", b"upstreams", lw, "linewarden")

    client = subprocess.run(ns(prefix, "client") + [PY, "-c", CLIENT, json.dumps(QUERIES)],
                            capture_output=True, timeout=120, check=True)
    got = json.loads(client.stdout)
    by = [(g["name"], g["qtype"], g["tcp"]) for g in got]
    assert by == [(q[1], q[2], q[3]) for q in QUERIES]
    assert all("error" not in g for g in got), got
    www_a, www_aaaa, nowhere, alias, casino, adult, via_bad, nope, big_udp, big_tcp = got
    assert www_a["answers"] == ["192.0.2.10"] and www_aaaa["answers"] == ["2001:db8::10"]
    assert nowhere["answers"] == ["192.0.2.10"]
    assert alias["answers"] == ["www.lw.test.", "192.0.2.10"]
    assert casino["rcode"] == 3 and casino["answers"] == []
    assert adult["rcode"] == 0 and adult["answers"] == [SINKHOLE]
    assert via_bad["rcode"] == 3 and via_bad["answers"] == []
    assert nope["rcode"] == 3
    assert big_udp["tc"] == 1 and big_udp["answers"] == []
    assert big_tcp["tc"] == 0 and len(big_tcp["answers"]) == 20

    lw.send_signal(signal.SIGTERM)
    assert lw.wait(60) == 0, (tmp_path / "linewarden.log").read_text()

    from storage.query import query
    from storage.records import Alarm, Dns

    records = list(query(store))
    dns = sorted((r for r in records if isinstance(r, Dns)), key=lambda r: (r.ts, r.uid))
    assert len(dns) == len(QUERIES), [(r.qname, r.qtype_name) for r in dns]
    expected = {
        (g["name"], g["qtype"], "tcp" if g["tcp"] else "udp", g["id"]): g for g in got}
    for r in dns:
        key = (r.qname, r.qtype_name, r.transport, r.dns_id)
        assert key in expected, key
        g = expected.pop(key)
        assert r.client_ip == CLIENT_IP and r.account == "alice" and r.client_port
        assert r.rcode == g["rcode"]
        assert [a.rstrip(".") for a in r.answers] == [a.rstrip(".") for a in g["answers"]] \
            or (g["qtype"] == "TXT" and len(r.answers) == len(g["answers"]))
        assert r.ruleset_version == 3
        blocked = g["name"] in ("casino.lw.test", "adult.lw.test", "via-bad.lw.test")
        assert r.action == ("block" if blocked else "allow"), r
    assert not expected
    alarms = [r for r in records if isinstance(r, Alarm) and r.alarm_kind == "illegal_content"]
    assert len(alarms) == 3
