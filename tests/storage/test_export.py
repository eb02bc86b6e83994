"""storage/export.py: JSON lines / CSV hand-over and RFC 5424 syslog to a real listener."""

from __future__ import annotations

import io
import json
import re
import socket
import threading

import pytest

from storage.export import SyslogSender, export, parse_syslog_target, rfc5424
from storage.records import Alarm, Http
from tests.storage.conftest import one_of_each

RFC5424 = re.compile(rb"^<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) linewarden (\S+) (\S{1,32}) - \xef\xbb\xbf(\{.*\})$", re.S)


def test_jsonl_and_csv():
    recs = one_of_each(1_767_546_000_000_000)
    out = io.StringIO()
    assert export(recs, out, "jsonl") == 8
    assert [json.loads(x)["kind"] for x in out.getvalue().splitlines()][:3] == ["dns", "conn", "tls"]
    out = io.StringIO()
    assert export(recs, out, "csv") == 8
    assert out.getvalue().count("\n") == 9
    with pytest.raises(ValueError):
        export(recs, io.StringIO(), "xml")


def test_rfc5424_message_shape_and_severity():
    m = RFC5424.match(rfc5424(Alarm(ts=1_767_546_000_123_456, alarm_kind="disk_low"), hostname="gw 1"))
    assert m and m.group(1) == b"129" and m.group(2) == b"2026-01-04T17:00:00.123456Z"  # local0.alert
    assert m.group(3) == b"gw1" and m.group(5) == b"alarm"
    blocked = RFC5424.match(rfc5424(Http(ts=1, action="block"), hostname="gw"))
    assert blocked and blocked.group(1) == b"132"  # local0.warning
    assert json.loads(blocked.group(6))["kind"] == "http"


@pytest.mark.parametrize("text, ok", [("udp://127.0.0.1:5514", True), ("tcp://[::1]", True), ("http://x", False), ("udp://", False)])
def test_parse_target(text, ok):
    if ok:
        assert parse_syslog_target(text).port in (5514, 601)
    else:
        with pytest.raises(ValueError):
            parse_syslog_target(text)


def test_udp_forwarding_to_a_local_listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    port = srv.getsockname()[1]
    s = SyslogSender(f"udp://127.0.0.1:{port}")
    recs = one_of_each(1_767_546_000_000_000)
    assert s.send_many(recs) == 8
    got = [srv.recv(70000) for _ in recs]
    s.close()
    srv.close()
    assert all(RFC5424.match(g) for g in got)
    assert [json.loads(RFC5424.match(g).group(6))["kind"] for g in got] == [r.__struct_config__.tag for r in recs]


def test_tcp_forwarding_uses_octet_counting():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    data = bytearray()

    def serve():
        c, _ = srv.accept()
        with c:
            while chunk := c.recv(65536):
                data.extend(chunk)

    t = threading.Thread(target=serve)
    t.start()
    s = SyslogSender(f"tcp://127.0.0.1:{port}")
    recs = one_of_each(1_767_546_000_000_000)
    assert s.send_many(recs) == 8
    s.close()
    t.join(5)
    srv.close()
    msgs, buf = [], bytes(data)
    while buf:  # RFC 6587: MSG-LEN SP SYSLOG-MSG
        n, _, rest = buf.partition(b" ")
        msgs.append(rest[: int(n)])
        buf = rest[int(n):]
    assert len(msgs) == 8 and all(RFC5424.match(m) for m in msgs)


def test_unreachable_collector_is_counted_not_raised():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()  # nothing listens there now
    s = SyslogSender(f"tcp://127.0.0.1:{port}", timeout=0.5)
    assert s.send_many(one_of_each(1)[:2]) == 0 and s.failed == 2


def test_writer_forwards_committed_records_live(tmp_path):
    from storage.config import StoreConfig
    from storage.writer import write_records
    from tests.storage.conftest import clock

    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    port = srv.getsockname()[1]
    recs = one_of_each(1_767_546_000_000_000)
    write_records(tmp_path / "s", recs, StoreConfig(syslog=f"udp://127.0.0.1:{port}"), clock=clock)
    got = []
    try:
        while len(got) < 9:  # the 8 records and the keys.init maintenance record
            got.append(json.loads(RFC5424.match(srv.recv(70000)).group(6)))
    finally:
        srv.close()
    assert sorted(g["kind"] for g in got) == sorted([r.__struct_config__.tag for r in recs] + ["maintenance"])
