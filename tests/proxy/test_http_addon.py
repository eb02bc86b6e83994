"""The mitmproxy addon (proxy/http_addon.py), driven with mitmproxy's taddons and tflow: no sockets."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from mitmproxy import exceptions, http
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow, tutils

from proxy.http_addon import LinewardenHttp, _ScanningStream, parse_conn_header
from rules.engine import Engine
from storage.records import Http, Record

KEYWORD = "澳门赌场代理"
RULES = {
    "ruleset.toml": 'name = "addon-test"\nversion = 4\n\n[categories.gambling]\naction = "block"\n\n'
    '[categories.watch]\naction = "log"\n',
    "keywords.tsv": f"id\tcategory\tkeyword\nK1\tgambling\t{KEYWORD}\nK2\twatch\twatchword\n",
    "domains.tsv": "id\tcategory\tdomain\nD1\tgambling\tcasino.example\n",
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    d: Path = tmp_path_factory.mktemp("rules")
    for name, text in RULES.items():
        (d / name).write_text(text, encoding="utf-8")
    return Engine.from_dir(d)


class Sink:
    """The writer's ``submit`` contract: takes a record, returns True."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def __call__(self, record: Record) -> bool:
        self.records.append(record)
        return True

    @property
    def http(self) -> list[Http]:
        return [r for r in self.records if isinstance(r, Http)]


def req(method: str = "GET", path: str = "/", host: str = "www.example.org", body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None) -> http.Request:
    hdrs = [(b"Host", host.encode()), (b"User-Agent", b"t")] + (headers or [])
    if body:
        hdrs.append((b"Content-Length", str(len(body)).encode()))
    return tutils.treq(method=method.encode(), host=host, port=443, scheme=b"https", path=path.encode(),
                       headers=http.Headers(hdrs), content=body)


def resp(body: bytes, ctype: bytes = b"text/html; charset=utf-8", extra: list[tuple[bytes, bytes]] | None = None) -> http.Response:
    hdrs = [(b"Content-Type", ctype), (b"Content-Length", str(len(body)).encode())] + (extra or [])
    return tutils.tresp(headers=http.Headers(hdrs), content=body)


@pytest.fixture
def addon(engine: Engine) -> tuple[LinewardenHttp, Sink]:
    sink = Sink()
    return LinewardenHttp(engine, sink), sink


async def run_flow(a: LinewardenHttp, f: http.HTTPFlow, response: http.Response | None) -> None:
    """requestheaders → request → (server) → responseheaders → response, as mitmproxy does."""
    a.requestheaders(f)
    if f.response is None:
        a.request(f)
    if f.response is None and response is not None:
        f.response = response
        a.responseheaders(f)
        if f.response is response and not f.response.stream:
            a.response(f)
    elif f.response is not None:
        a.response(f)


async def test_clean_flow_passes_and_is_recorded(addon: tuple[LinewardenHttp, Sink]) -> None:
    a, sink = addon
    with taddons.context(a):
        f = tflow.tflow(req=req(path="/news?id=1"))
        page = b"<html><body>hello</body></html>"
        await run_flow(a, f, resp(page))
    assert f.response is not None and f.response.status_code == 200 and f.response.content == page
    [h] = sink.http
    assert (h.action, h.method, h.host, h.url, h.status) == ("allow", "GET", "www.example.org", "/news?id=1", 200)
    assert h.ruleset_version == 4 and h.resp_bytes == len(page)


async def test_blocked_host_gets_451_before_the_server(addon: tuple[LinewardenHttp, Sink]) -> None:
    a, sink = addon
    with taddons.context(a):
        f = tflow.tflow(req=req(host="www.casino.example"))
        a.requestheaders(f)
    assert f.response is not None and f.response.status_code == 451
    body = f.response.content.decode()
    assert "gambling" in body and "casino.example" not in body
    [h] = sink.http
    assert h.action == "block" and h.rule_ids == ["D1"] and h.status is None
    assert h.uid in body


async def test_blocked_post_body_never_reaches_the_server(addon: tuple[LinewardenHttp, Sink]) -> None:
    a, sink = addon
    post = f"title=x&content=最新{KEYWORD}网址".encode()
    with taddons.context(a):
        f = tflow.tflow(req=req("POST", "/forum/post", body=post,
                                headers=[(b"Content-Type", b"application/x-www-form-urlencoded")]))
        a.requestheaders(f)
        assert f.response is None and not f.request.stream  # held: mitmproxy buffers it
        a.request(f)
    # A response set in the request hook is sent instead of contacting the server.
    assert f.response is not None and f.response.status_code == 451
    [h] = sink.http
    assert (h.method, h.action, h.rule_ids, h.category) == ("POST", "block", ["K1"], "gambling")
    assert KEYWORD in (h.evidence or "")


async def test_blocked_response_is_replaced_by_the_block_page(addon: tuple[LinewardenHttp, Sink]) -> None:
    a, sink = addon
    bad = gzip.compress(f"<p>{KEYWORD}</p>".encode(), mtime=0)
    with taddons.context(a):
        f = tflow.tflow(req=req())
        await run_flow(a, f, resp(bad, extra=[(b"Content-Encoding", b"gzip")]))
    assert f.response is not None and f.response.status_code == 451
    assert KEYWORD not in f.response.content.decode()
    [h] = sink.http
    assert h.action == "block" and h.status == 200 and h.content_type == "text/html; charset=utf-8"


async def test_log_rule_passes_with_a_record(addon: tuple[LinewardenHttp, Sink]) -> None:
    a, sink = addon
    with taddons.context(a):
        f = tflow.tflow(req=req())
        await run_flow(a, f, resp(b"a watchword", b"text/plain"))
    assert f.response is not None and f.response.status_code == 200
    assert sink.http[0].action == "log" and sink.http[0].rule_ids == ["K2"]


async def test_media_is_streamed_untouched(addon: tuple[LinewardenHttp, Sink]) -> None:
    a, _ = addon
    with taddons.context(a):
        f = tflow.tflow(req=req())
        a.requestheaders(f)
        a.request(f)
        f.response = resp(KEYWORD.encode() * 10, b"video/mp4")
        a.responseheaders(f)
    assert f.response.stream is True


async def test_over_cap_block_policy_answers_451(addon: tuple[LinewardenHttp, Sink]) -> None:
    a, sink = addon
    with taddons.context(a) as tctx:
        tctx.configure(a, linewarden_over_cap="block", linewarden_response_hold_max=16)
        f = tflow.tflow(req=req())
        a.requestheaders(f)
        a.request(f)
        f.response = resp(b"x" * 100)
        a.responseheaders(f)
    assert f.response.status_code == 451
    # The server's body is swallowed and the page sent at its end.
    assert callable(f.response.stream)
    assert f.response.stream(b"x" * 100) == b"" and f.response.stream(b"").startswith(b"<!DOCTYPE html>")
    [h] = sink.http
    assert h.action == "block" and "response_hold_max" in (h.evidence or "")


async def test_over_cap_stream_policy_scans_and_kills_on_a_late_match(addon: tuple[LinewardenHttp, Sink]) -> None:
    a, sink = addon
    with taddons.context(a) as tctx:
        tctx.configure(a, linewarden_response_hold_max=16)
        f = tflow.tflow(req=req())
        a.requestheaders(f)
        a.request(f)
        f.response = resp(b"y" * 64 + KEYWORD.encode())
        a.responseheaders(f)
        stream = f.response.stream
        assert isinstance(stream, _ScanningStream)
        assert stream(b"y" * 32) == b""  # one piece behind
        assert stream(b"y" * 32) == b"y" * 32  # forwarded while clean
        assert stream(KEYWORD.encode()) == b"y" * 32
        assert stream(b"") == b""  # the match (found at the latest at the end) stops the last piece
    assert f.error is not None  # killed: a cut body must not look whole
    [h] = sink.http
    assert h.action == "block" and h.rule_ids == ["K1"]


async def test_fast_path_connect_header_gives_the_real_client(engine: Engine) -> None:
    sink = Sink()
    nat: dict[str, tuple[str, int]] = {}
    a = LinewardenHttp(engine, sink, nat_table=nat)
    with taddons.context(a):
        f = tflow.tflow(req=req("CONNECT", host="www.example.org",
                                headers=[(b"X-Linewarden-Conn", b"Cabc123 10.0.0.23 51515")]))
        a.http_connect(f)
        f.server_conn.sockname = ("198.51.100.9", 40001)
        a.server_connected(server_hooks.ServerConnectionHookData(f.server_conn, f.client_conn))
        g = tflow.tflow(client_conn=f.client_conn, server_conn=f.server_conn, req=req())
        await run_flow(a, g, resp(b"ok", b"text/plain"))
    [h] = sink.http
    assert (h.uid, h.client_ip, h.client_port) == ("Cabc123", "10.0.0.23", 51515)
    assert (h.nat_ip, h.nat_port) == ("198.51.100.9", 40001)
    assert nat == {"Cabc123": ("198.51.100.9", 40001)}


@pytest.mark.parametrize(
    "value, message",
    [("Cabc 1.2.3.4", "expected 'uid ip port'"), ("C-x 1.2.3.4 80", "bad uid"), ("C1 1.2.3.4 99999", "bad port")],
)
def test_parse_conn_header_rejects(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_conn_header(value)


@pytest.mark.parametrize(
    "option, value",
    [("linewarden_response_hold_max", -1), ("linewarden_request_hold_max", -5),
     ("linewarden_blocked_by", "not a uri"), ("linewarden_over_cap", "maybe")],
)
def test_bad_options_raise_options_error(engine: Engine, option: str, value: object) -> None:
    a = LinewardenHttp(engine, Sink())
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(a, **{option: value})


@pytest.mark.parametrize("fail, status", [("open", 200), ("closed", 451)])
async def test_undecodable_body_follows_the_fail_policy(engine: Engine, fail: str, status: int) -> None:
    sink = Sink()
    a = LinewardenHttp(engine, sink)
    with taddons.context(a) as tctx:
        tctx.configure(a, linewarden_fail=fail)
        f = tflow.tflow(req=req())
        # Declared gzip, but not gzip: the decoder reports an error.
        await run_flow(a, f, resp(b"this is not gzip at all", extra=[(b"Content-Encoding", b"gzip")]))
    assert f.response is not None and f.response.status_code == status
    assert sink.http[0].action == ("block" if fail == "closed" else "allow")
