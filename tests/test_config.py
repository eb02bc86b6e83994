"""linewarden/config.py: TOML config, defaults, validation messages, flags on top."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from linewarden.config import (
    Config,
    ConfigError,
    DnsConfig,
    config_from_mapping,
    describe,
    load_config,
    parse_hostport,
    resolv_conf_nameserver,
)


def test_embedded_defaults() -> None:
    c = load_config(None)
    assert c.dns.listen == "127.0.0.1:5353" and c.http.listen == "127.0.0.1:8080"
    assert c.store.dir == "./var" and c.rules.dir == "" and c.http.mode == "explicit"
    assert c.dns.strip_ech is True and c.dns.upstreams == ()


def test_full_file(tmp_path: Path) -> None:
    f = tmp_path / "lw.toml"
    f.write_text(
        """
[rules]
dir = "/etc/linewarden/rules"
[store]
dir = "/var/lib/linewarden"
retention_days = 90
[http]
listen = "0.0.0.0:3128"
mode = "transparent"
[dns]
listen = "0.0.0.0:53"
upstreams = ["192.0.2.53", "[2001:db8::53]:5353"]
timeout_ms = 800
strip_ech = false
[dns.sinkhole]
gambling = ["192.0.2.80", "2001:db8::80"]
adult = "192.0.2.81"
[[identity.binding]]
ip = "10.0.0.23"
account = "alice"
"""
    )
    c = load_config(f)
    assert c.source == str(f)
    assert c.rules.dir == "/etc/linewarden/rules" and c.store.dir == "/var/lib/linewarden"
    assert c.store.options["retention_days"] == 90
    assert c.store.store_config().retention_days == 90
    assert c.http.mode == "transparent"
    assert c.dns.upstream_addresses() == [("192.0.2.53", 53), ("2001:db8::53", 5353)]
    assert c.dns.timeout_ms == 800 and c.dns.strip_ech is False
    assert dict(c.dns.sinkhole) == {"gambling": ("192.0.2.80", "2001:db8::80"), "adult": ("192.0.2.81",)}
    assert c.identity[0].account == "alice"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"dsn": {}}, "unknown table(s) dsn"),
        ({"dns": {"listn": "x"}}, "[dns]: unknown key(s) listn"),
        ({"dns": {"timeout_ms": "fast"}}, "dns.timeout_ms: expected an integer, got 'fast'"),
        ({"dns": {"timeout_ms": 1}}, "dns.timeout_ms: 1 is below the minimum 10"),
        ({"dns": {"strip_ech": 1}}, "dns.strip_ech: expected true or false"),
        ({"dns": {"upstreams": "1.1.1.1"}}, "dns.upstreams: expected a list of strings"),
        ({"dns": {"upstreams": ["resolver.example"]}}, "dns.upstreams[0]"),
        ({"dns": {"listen": "127.0.0.1:99999"}}, "dns.listen: '127.0.0.1:99999': port"),
        ({"dns": {"workers": 17}}, "dns.workers: 17 is above the maximum 16"),
        ({"dns": {"sinkhole": {"x": ["nope"]}}}, "dns.sinkhole.x: 'nope' is not an IP address"),
        ({"dns": {"sinkhole": {"x": ["192.0.2.1", "192.0.2.2"]}}}, "at most one IPv4"),
        ({"http": {"mode": "sideways"}}, "http.mode: 'sideways' is not one of explicit, transparent"),
        ({"identity": {"binding": [{"ip": "10.0.0.1"}]}}, "identity.binding[0]"),
        ({"store": {"dir": ""}}, "store.dir: expected a non-empty string"),
        ({"rules": []}, "[rules] must be a table"),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_mapping(data)
    assert message in str(e.value)


def test_unknown_store_key_is_refused_when_building_store_config() -> None:
    c = config_from_mapping({"store": {"retension_days": 90}})
    with pytest.raises(ConfigError, match="unknown key.*retension_days"):
        c.store.store_config()
    with pytest.raises(ConfigError, match="retention_days"):
        config_from_mapping({"store": {"retention_days": 5}}).store.store_config()


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dns\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)


def test_flags_override_the_file() -> None:
    c = config_from_mapping({"dns": {"listen": "0.0.0.0:53", "upstreams": ["192.0.2.1"]}})
    c2 = c.with_flags(dns_listen="127.0.0.1:5300", dns_upstreams=["127.0.0.1:5301", "::1"],
                      rules="/r", store="/s", http_listen="127.0.0.1", mode="transparent")
    assert c2.dns.listen == "127.0.0.1:5300"
    assert c2.dns.upstreams == ("127.0.0.1:5301", "[::1]:53")
    assert (c2.rules.dir, c2.store.dir, c2.http.listen, c2.http.mode) == ("/r", "/s", "127.0.0.1:8080", "transparent")
    assert c.with_flags() == c  # no flags: unchanged
    with pytest.raises(ConfigError, match="--dns-listen"):
        c.with_flags(dns_listen="localhost:53")


@pytest.mark.parametrize(
    "text, expected",
    [("127.0.0.1:53", ("127.0.0.1", 53)), ("127.0.0.1", ("127.0.0.1", 99)),
     ("[::1]:5353", ("::1", 5353)), ("::1", ("::1", 99)), ("[::1]", ("::1", 99))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, 99) == expected


@pytest.mark.parametrize("text", ["host:53", "1.2.3.4:x", "[::1", "1.2.3.4:70000", ""])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text, 53)


def test_default_upstream_is_first_resolv_conf_nameserver(tmp_path: Path) -> None:
    rc = tmp_path / "resolv.conf"
    rc.write_text("# comment\nsearch example\nnameserver bogus\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert resolv_conf_nameserver(rc) == "192.0.2.53:53"
    assert Config().resolved_upstreams(rc) == ("192.0.2.53:53",)
    rc.write_text("nameserver fe80::1%eth0\n")
    assert resolv_conf_nameserver(rc) == "[fe80::1]:53"
    assert resolv_conf_nameserver(tmp_path / "none") is None
    explicit = Config().with_flags(dns_upstreams=["127.0.0.1:5399"])
    assert explicit.resolved_upstreams(rc) == ("127.0.0.1:5399",)


def test_every_key_is_documented() -> None:
    table = describe()
    for f in dataclasses.fields(DnsConfig):
        assert f.metadata.get("doc"), f.name
        assert f"dns.{f.name}" in table or f.name == "sinkhole"
    assert "dns.sinkhole.CATEGORY" in table and "identity.binding" in table


def test_deploy_readme_documents_every_dns_key() -> None:
    readme = (Path(__file__).resolve().parents[1] / "deploy" / "README.md").read_text()
    for f in dataclasses.fields(DnsConfig):
        key = "dns.sinkhole.CATEGORY" if f.name == "sinkhole" else f"dns.{f.name}"
        assert f"`{key}`" in readme, key


def test_deploy_readme_lists_every_key_with_its_default() -> None:
    """deploy/README.md's key table is describe()'s output, so it cannot drift."""
    from pathlib import Path

    from linewarden.config import describe

    readme = (Path(__file__).resolve().parent.parent / "deploy" / "README.md").read_text("utf-8")
    assert describe().strip() in readme, "regenerate deploy/README.md's table from describe()"
