"""End to end in network namespaces (deploy/lab.sh): client → gateway (nftables redirect
of tcp 80/443 + ``linewarden run`` in transparent mode) → real HTTP and TLS servers.

Allowed pages must arrive byte-identical (gzip and chunked included), a blocked page
is replaced by the 451 page, a blocked POST never reaches the server (the server's own
log is checked), an SNI block ends the handshake, and the store holds records that
match what happened, field by field, the NAT address and port included (the server
logs the source address it saw; it must equal the record's nat_ip:nat_port). The
client first resolves www.lw.test through the shim (its query to the server's
resolver is redirected to the gateway), so every conn record carries that name
as ``dns_name`` (linewarden/dnsjoin.py), though DNS and HTTP run in separate
worker processes. Each TLS request is made twice: the second, on a verdict the
first one's made the proxy remember, is carried by the C passthrough
(proxy/_passthrough.c, on by default), and its records must equal the first's.
"""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.lab import ROOT, lab_session, ns, wait_for

PY = sys.executable
SERVER_IP = "203.0.113.53"
GW_WAN_IP = "203.0.113.1"
CLIENT_IP = "198.51.100.10"
PROXY_PORT = 8080
DNS_PORT = 5353
KEYWORD = "澳门赌场代理"
SAME_TRAFFIC_VARIES = frozenset({"uid", "ts", "ts_end", "client_port", "nat_port", "community_id"})
"""Record fields that differ between two connections of equal traffic."""

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


RULESET = 'name = "e2e-proxy"\nversion = 5\n\n[categories.gambling]\naction = "block"\n\n[categories.doh]\naction = "block"\n'
KEYWORDS = f"id\tcategory\tkeyword\nK1\tgambling\t{KEYWORD}\n"
DOMAINS = "id\tcategory\tdomain\nD1\tdoh\tdoh.lw.test\n"

# The server's resolver: dnsmasq, authoritative for lw.test only, never recursing.
DNSMASQ = f"""port=53
listen-address={SERVER_IP}
bind-interfaces
no-resolv
no-hosts
no-poll
local=/lw.test/
local-ttl=300
host-record=www.lw.test,{SERVER_IP}
"""

# The server: HTTP on :80 and TLS on :443, logging every request with the peer it saw.
SERVER = r"""
import asyncio, gzip, json, ssl, sys
log = open(sys.argv[1], "a", buffering=1)
PAGE = ("<html><body>" + "欢迎访问本站。" * 200 + "</body></html>").encode()
BAD = ("<html><body><p>最新KEYWORD网址</p></body></html>").encode()
GZ = gzip.compress(PAGE, mtime=0)
def resp(headers, body=b"", chunks=None):
    head = "HTTP/1.1 200 OK\r\n" + "".join(h + "\r\n" for h in headers)
    if chunks is not None:
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"".join(
            b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return (head + "Content-Length: %d\r\n\r\n" % len(body)).encode() + body
ROUTES = {
    "/plain": resp(["Content-Type: text/html; charset=utf-8"], PAGE),
    "/gzip": resp(["Content-Type: text/html; charset=utf-8", "Content-Encoding: gzip"], GZ),
    "/chunked": resp(["Content-Type: text/html; charset=utf-8"], chunks=[PAGE[:7], PAGE[7:2000], PAGE[2000:]]),
    "/bad": resp(["Content-Type: text/html; charset=utf-8"], BAD),
}
async def handle(reader, writer):
    peer = writer.get_extra_info("peername")
    tls = writer.get_extra_info("sslcontext") is not None
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
            body = b""
            low = head.lower()
            if b"content-length:" in low:
                body = await reader.readexactly(int(low.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]))
            log.write(json.dumps({"peer": list(peer[:2]), "tls": tls, "method": method, "path": path,
                                  "body": body.decode("utf-8", "replace")}) + "\n")
            writer.write(ROUTES.get(path, resp(["Content-Type: text/plain"], b"got " + body)))
            await writer.drain()
            if b"connection: close" in low:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    a = await asyncio.start_server(handle, sys.argv[4], 80)
    b = await asyncio.start_server(handle, sys.argv[4], 443, ssl=ctx)
    print("ready", flush=True)
    await asyncio.gather(a.serve_forever(), b.serve_forever())
asyncio.run(main())
""".replace("KEYWORD", KEYWORD)

# The client: raw HTTP/1.1 to the server's address (nftables sends it to the proxy).
CLIENT = r"""
import json, socket, ssl, sys
server = sys.argv[1]
out = {}
from dnslib import DNSRecord
# Resolve first, as a browser does: to the server's resolver (nftables sends it to the shim).
answer = DNSRecord.parse(DNSRecord.question("www.lw.test").send(server, 53, timeout=5))
out["resolved"] = [str(rr.rdata) for rr in answer.rr]
def http(name, raw, tls_sni=None):
    s = socket.create_connection((server, 443 if tls_sni else 80), timeout=10)
    port = s.getsockname()[1]
    try:
        if tls_sni:
            ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(s, server_hostname=tls_sni)
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        out[name] = {"port": port, "raw": data.hex()}
    except Exception as e:
        out[name] = {"port": port, "error": repr(e)}
    finally:
        s.close()
def get(path):
    return ("GET %s HTTP/1.1\r\nHost: www.lw.test\r\nUser-Agent: lw-e2e\r\nConnection: close\r\n\r\n" % path).encode()
for p in ("/plain", "/gzip", "/chunked", "/bad"):
    http(p, get(p))
body = ("title=x&content=最新" + sys.argv[2] + "网址").encode()
http("post-bad", b"POST /forum HTTP/1.1\r\nHost: www.lw.test\r\nContent-Type: application/x-www-form-urlencoded\r\n"
     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
http("post-ok", b"POST /forum HTTP/1.1\r\nHost: www.lw.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
http("tls-ok", get("/plain"), tls_sni="www.lw.test")
http("tls-doh", get("/plain"), tls_sni="doh.lw.test")
# Again: the verdicts are remembered now, and the C passthrough carries these.
http("tls-ok-2", get("/plain"), tls_sni="www.lw.test")
http("tls-doh-2", get("/plain"), tls_sni="doh.lw.test")
if sys.argv[3] == "intercept":
    http("tls-bad", get("/bad"), tls_sni="www.lw.test")
    http("tls-post-bad", b"POST /forum HTTP/1.1\r\nHost: www.lw.test\r\nContent-Type: application/x-www-form-urlencoded\r\n"
         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body, tls_sni="www.lw.test")
print(json.dumps(out))
"""


def _cert(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    # RSA: every handshake is the same number of bytes (an ECDSA signature's DER length
    # varies), so two connections of equal traffic have equal conn records.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.lw.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("www.lw.test"), x509.DNSName("doh.lw.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    c, k = tmp / "cert.pem", tmp / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def _parse(raw_hex: str):  # type: ignore[no-untyped-def]
    from rules.wire import parse_message

    return parse_message(bytes.fromhex(raw_hex))


@pytest.fixture
def lab():
    with lab_session("lw", LW_PROXY_PORT=str(PROXY_PORT), LW_DNS_PORT=str(DNS_PORT)) as handle:
        yield handle


def start_servers(prefix: str, procs: list[subprocess.Popen[bytes]], tmp_path: Path,
                  dnsmasq_conf: str) -> Path:
    """The origin (HTTP and TLS) and dnsmasq (authoritative for lw.test only) in the
    server namespace; returns the origin's request log."""
    cert, key = _cert(tmp_path)
    server_log = tmp_path / "server.jsonl"
    server_out = tmp_path / "server.out"
    with open(server_out, "wb") as out:
        server = subprocess.Popen(ns(prefix, "server") + [PY, "-c", SERVER, str(server_log), str(cert), str(key),
                                                           SERVER_IP], stdout=out, stderr=subprocess.STDOUT)
    procs.append(server)
    wait_for(server_out, b"ready", server, "server")
    (tmp_path / "dnsmasq.conf").write_text(dnsmasq_conf)
    procs.append(subprocess.Popen(ns(prefix, "server") + [
        "dnsmasq", "--keep-in-foreground", f"--conf-file={tmp_path / 'dnsmasq.conf'}", "--pid-file=",
        "--user=root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return server_log


def write_gateway_config(tmp_path: Path, *, workers: int, intercept: list[str], ruleset: str = RULESET,
                         keywords: str = KEYWORDS, domains: str = DOMAINS) -> tuple[Path, Path, Path]:
    """The test rules and the gateway's linewarden.toml; returns (rules, store, config)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "ruleset.toml").write_text(ruleset)
    (rules / "keywords.tsv").write_text(keywords, encoding="utf-8")
    (rules / "domains.tsv").write_text(domains)
    store = tmp_path / "store"
    config = tmp_path / "linewarden.toml"
    config.write_text(f"""
[rules]
dir = "{rules}"
[store]
dir = "{store}"
commit_interval_ms = 50
[http]
listen = "0.0.0.0:{PROXY_PORT}"
mode = "transparent"
workers = {workers}
intercept = {json.dumps(intercept)}
ca_dir = "{tmp_path / 'ca'}"
upstream_verify = false
[dns]
listen = "0.0.0.0:{DNS_PORT}"
upstreams = ["{SERVER_IP}:53"]
workers = {workers}
[[identity.binding]]
ip = "{CLIENT_IP}"
account = "alice"
""")
    return rules, store, config


def start_linewarden(prefix: str, procs: list[subprocess.Popen[bytes]], tmp_path: Path,
                     config: Path) -> subprocess.Popen[bytes]:
    """`linewarden run` in the gateway namespace, once every service serves."""
    lw_log = tmp_path / "linewarden.log"
    with open(lw_log, "wb") as out:
        lw = subprocess.Popen(ns(prefix, "gw") + [PY, "-m", "linewarden", "run", "--config", str(config)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    procs.append(lw)
    wait_for(lw_log, b"linewarden: store", lw, "linewarden")  # printed once every service serves
    return lw


@pytest.mark.parametrize("path", ["fastpath", "intercept"])
def test_http_and_tls_through_the_transparent_gateway(lab, tmp_path: Path, path: str) -> None:
    """``fastpath``: one worker, TLS decided by SNI and spliced. ``intercept``: two
    worker processes, www.lw.test handed to mitmproxy and given the full HTTP treatment."""
    prefix, procs = lab
    intercept = path == "intercept"
    server_log = start_servers(prefix, procs, tmp_path, DNSMASQ)
    _rules, store, config = write_gateway_config(tmp_path, workers=2 if intercept else 1,
                                                 intercept=["www.lw.test"] if intercept else [])
    if intercept:
        from proxy.tls_ca import init_ca

        init_ca(tmp_path / "ca")
    lw = start_linewarden(prefix, procs, tmp_path, config)
    lw_log = tmp_path / "linewarden.log"

    client = subprocess.run(ns(prefix, "client") + [PY, "-c", CLIENT, SERVER_IP, KEYWORD, path],
                            capture_output=True, timeout=120)
    assert client.returncode == 0, client.stderr.decode()
    got = json.loads(client.stdout)
    assert got.pop("resolved") == [SERVER_IP]

    # Allowed pages: byte-identical, head and body, gzip and chunked included.
    import importlib.util

    spec = importlib.util.spec_from_loader("srv", loader=None)
    srv = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    exec(SERVER.split("async def handle")[0].replace('log = open(sys.argv[1], "a", buffering=1)', ""), srv.__dict__)
    for path in ("/plain", "/gzip", "/chunked"):
        assert "error" not in got[path], got[path]
        raw = bytes.fromhex(got[path]["raw"])
        assert _parse(got[path]["raw"]).body == _parse(srv.ROUTES[path].hex()).body, path
        if path != "/chunked":
            assert raw == srv.ROUTES[path], path
    for name in ("tls-ok", "tls-ok-2"):
        assert "error" not in got[name], got[name]
        assert _parse(got[name]["raw"]).body == _parse(srv.ROUTES["/plain"].hex()).body, name
    if not intercept:
        assert bytes.fromhex(got["tls-ok"]["raw"]) == bytes.fromhex(got["tls-ok-2"]["raw"]) == srv.ROUTES["/plain"]

    # Blocks.
    bad = _parse(got["/bad"]["raw"])
    assert bad.status == 451 and KEYWORD not in bad.body.decode()
    assert _parse(got["post-bad"]["raw"]).status == 451
    assert _parse(got["post-ok"]["raw"]).body == b"got hello"
    for name in ("tls-doh", "tls-doh-2"):
        assert "error" in got[name] and "ACCESS_DENIED" in got[name]["error"].upper().replace(" ", "_"), got[name]

    if intercept:
        for name in ("tls-bad", "tls-post-bad"):
            page = _parse(got[name]["raw"])
            assert page.status == 451 and KEYWORD not in page.body.decode(), name

    seen = [json.loads(line) for line in server_log.read_text().splitlines()]
    assert not any(KEYWORD in s["body"] for s in seen)  # the blocked POSTs never reached the server
    assert [s["body"] for s in seen if s["method"] == "POST"] == ["hello"]

    # The C passthrough ran in the HTTP workers (it carried the second TLS requests:
    # tests/proxy/test_passthrough.py shows which path carries what).
    from proxy.fastpath import native_passthrough_available

    assert _passthrough_loaded(lw.pid) == native_passthrough_available()

    lw.send_signal(signal.SIGTERM)
    assert lw.wait(60) == 0, lw_log.read_text()

    from storage.query import query
    from storage.records import Conn, Dns, Http, Tls

    records = list(query(store))
    https = [r for r in records if isinstance(r, Http)]
    conns = {r.uid: r for r in records if isinstance(r, Conn)}
    tlss = [r for r in records if isinstance(r, Tls)]
    # The shim recorded the resolution, and every connection to the answer names it.
    assert [(d.client_ip, d.qname, d.answers) for d in records if isinstance(d, Dns)] == [
        (CLIENT_IP, "www.lw.test", [SERVER_IP])]
    assert {(c.server_ip, c.dns_name) for c in conns.values()} == {(SERVER_IP, "www.lw.test")}
    by_port = {g["port"]: name for name, g in got.items()}
    peers = {(s["peer"][0], s["peer"][1]) for s in seen}
    for h in https:
        name = by_port[h.client_port]
        c = conns[h.uid]
        port = 443 if name.startswith("tls") else 80
        assert (h.client_ip, h.account, h.server_ip, h.server_port) == (CLIENT_IP, "alice", SERVER_IP, port), h
        assert h.host == "www.lw.test" and h.ruleset_version == 5
        blocked = name in ("/bad", "post-bad", "tls-bad", "tls-post-bad")
        assert h.action == ("block" if blocked else "allow"), (name, h)
        assert h.rule_ids == (["K1"] if blocked else [])
        if name != "post-bad" and name != "tls-post-bad":
            # The proxy's upstream socket: the address and port the server saw.
            assert (h.nat_ip, h.nat_port) in peers and h.nat_ip == GW_WAN_IP, (name, h)
            assert (c.nat_ip, c.nat_port) == (h.nat_ip, h.nat_port)
        elif name == "post-bad":
            assert h.nat_port is None and c.bytes_down == 0
        assert c.client_port == h.client_port and c.service == ("tls" if port == 443 else "http")
        assert c.bytes_up > 0
    expected = ["/plain", "/gzip", "/chunked", "/bad", "post-bad", "post-ok"]
    if intercept:
        expected += ["tls-ok", "tls-ok-2", "tls-bad", "tls-post-bad"]
    assert sorted(by_port[h.client_port] for h in https) == sorted(expected)
    sni = {(t.sni, t.action, t.intercepted) for t in tlss}
    assert sni == {("www.lw.test", "allow", intercept), ("doh.lw.test", "block", False)}
    for t in tlss:
        c = conns[t.uid]
        assert (t.client_ip, t.account, t.server_ip, t.server_port) == (CLIENT_IP, "alice", SERVER_IP, 443)
        if by_port[t.client_port] == "tls-post-bad":
            # mitmproxy connected, but the blocked POST never went out: the server logged nothing.
            assert t.nat_ip == GW_WAN_IP and t.nat_port and c.bytes_down > 0
        elif t.action == "allow":
            assert (t.nat_ip, t.nat_port) in peers and c.bytes_down > 0 and c.close_reason == "fin", t
        else:
            assert t.rule_ids == ["D1"] and c.close_reason == "blocked" and c.bytes_down == 0

    # The second TLS connections (the C passthrough's) have the first ones' records, field
    # by field but for what differs between any two connections. Through mitmproxy
    # (intercept) the client's handshake is with mitmproxy's certificate: its bytes may differ.
    tls_by = {by_port[t.client_port]: t for t in tlss}
    conn_by = {by_port[c.client_port]: c for c in conns.values() if c.proto == "tcp" and c.client_port in by_port}
    for first, second in (("tls-ok", "tls-ok-2"), ("tls-doh", "tls-doh-2")):
        varying = SAME_TRAFFIC_VARIES | ({"bytes_up", "bytes_down"} if intercept and first == "tls-ok" else set())
        for records in (tls_by, conn_by):
            assert _fields(records[second], varying) == _fields(records[first], varying), (second, records[second])
    tls_peers = {(s["peer"][0], s["peer"][1]) for s in seen if s["tls"]}
    ok, ok2 = conn_by["tls-ok"], conn_by["tls-ok-2"]
    assert (ok2.close_reason, ok2.nat_ip) == ("fin", GW_WAN_IP) and ok2.bytes_down > len(srv.ROUTES["/plain"])
    assert {(ok.nat_ip, ok.nat_port), (ok2.nat_ip, ok2.nat_port)} <= tls_peers  # the addresses the server saw
    assert ok.nat_port != ok2.nat_port
    doh2 = conn_by["tls-doh-2"]
    assert (doh2.close_reason, doh2.action, doh2.rule_ids, doh2.bytes_down) == ("blocked", "block", ["D1"], 0)
    assert (tls_by["tls-doh-2"].sni, tls_by["tls-doh-2"].nat_port) == ("doh.lw.test", None)


def _fields(record: object, varying: frozenset[str] | set[str]) -> dict[str, object]:
    import msgspec

    return {k: v for k, v in msgspec.structs.asdict(record).items() if k not in varying}  # type: ignore[arg-type]


def _passthrough_loaded(pid: int) -> bool:
    """Whether ``pid`` or one of its descendants (the worker processes) has the C
    passthrough (proxy/_passthrough.c) mapped: it is imported only when a fast path starts it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    todo, seen = [pid], set()
    while todo and len(seen) < 1000:
        p = todo.pop()
        seen.add(p)
        todo.extend(children.get(p, []))
        try:
            if "_passthrough" in Path(f"/proc/{p}/maps").read_text():
                return True
        except OSError:
            continue
    return False
