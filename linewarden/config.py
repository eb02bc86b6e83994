"""linewarden's configuration: one TOML file, frozen dataclasses, flags on top.

Owns: the config file format, every key with its default and meaning, the
validation of values (``ConfigError`` names the key and the bad value, as
mitmproxy's ``OptionsError`` does, STYLE.md 6), and the one place where
command-line flags override the file (``Config.with_flags``). Must not: start
anything, open sockets, or read files other than the config itself and (for
the one documented default) ``/etc/resolv.conf``.

Every key, its default and its meaning is in the ``doc`` metadata of a field
below; ``describe()`` prints them (deploy/README.md carries the same table).
A file only needs the keys it changes::

    [rules]
    dir = "/etc/linewarden/rules"        # default: the bundled sample rules

    [store]
    dir = "/var/lib/linewarden"          # default: ./var
    retention_days = 180                 # other keys go to storage's StoreConfig

    [http]
    listen = "0.0.0.0:8080"
    mode = "transparent"

    [dns]
    listen = "0.0.0.0:53"
    upstreams = ["192.0.2.53:53", "198.51.100.53:53"]

    [dns.sinkhole]                       # category -> addresses answered instead
    gambling = ["192.0.2.80", "2001:db8::80"]

    [[identity.binding]]
    ip = "10.0.0.23"
    account = "alice"
    mac = "02:00:00:00:00:17"
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from proxy.identity import Binding, parse_binding

RESOLV_CONF = Path("/etc/resolv.conf")


class ConfigError(ValueError):
    """The config file or a flag is wrong; the message names the key and the value."""


def _doc(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple/mapping default")
    return field(default=default, metadata={"doc": doc, **kw})


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``[V6]:PORT`` or ``[V6]`` → (host, port).

    The host must be an IP address: the shim and proxy bind and forward to
    addresses, never names (resolving a resolver's name is a chicken-and-egg).
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if port_text == "":
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not 0-65535")
    return host, int(port_text)


def resolv_conf_nameserver(path: Path = RESOLV_CONF) -> str | None:
    """The first ``nameserver`` of resolv.conf as ``HOST:53`` (None when there is none).

    Loopback entries are kept (systemd-resolved's 127.0.0.53 is a fine
    upstream); a missing file or no usable entry gives None.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            host = parts[1].split("%", 1)[0]
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                continue
            return f"[{ip}]:53" if ip.version == 6 else f"{ip}:53"
    return None


@dataclass(frozen=True, slots=True)
class RulesConfig:
    """``[rules]``: which rule set the Engine compiles."""

    dir: str = _doc("", "Rule-set directory; \"\" = the bundled sample rules (rules/sample).")
    backend: str = _doc("auto", "Keyword matcher: \"auto\", \"hyperscan\" or \"aho\".",
                        choices=("auto", "hyperscan", "aho"))
    pubkeys: tuple[str, ...] = _doc((), "Ed25519 public keys (PEM files or key directories) whose "
                                    "signed bundles `linewarden rules push` may install "
                                    "(README.md, Rule distribution); [] = pushes are refused.")
    managed_dir: str = _doc("", "Where pushed bundles are installed (current + previous, for "
                            "rollback); \"\" = <store.dir>/rules. When it holds an installed rule "
                            "set, that one is loaded at start instead of `rules.dir`.")
    control_socket: str = _doc("", "The local control socket (push, rollback); \"\" = "
                               "<store.dir>/control.sock. Mode 0600: only the service's user "
                               "may push, unless `rules.control_group` is set.")
    control_group: str = _doc("", "Group allowed to use the control socket (mode 0660); "
                              "\"\" = none (mode 0600).")


@dataclass(frozen=True, slots=True)
class StoreSection:
    """``[store]``: where records go. Keys other than ``dir`` are passed to
    ``storage.writer.StoreConfig`` (retention_days, timezone, batch_max,
    commit_interval_ms, queue_max, overflow, forensic ...; see storage/writer.py
    for their defaults)."""

    dir: str = _doc("./var", "Store directory (created when missing).")
    nice: int = _doc(15, "How much nicer than its workers the main process runs, which "
                     "records (channel readers, the DNS join, the store writer) while the "
                     "workers answer: when both want a core, answering goes first and recording "
                     "takes the slack. Only where every service runs in workers that stop taking "
                     "work while the store is behind: today the DNS workers (`dns.workers` >= 1) "
                     "with the HTTP proxy off; the HTTP workers keep accepting, so with them "
                     "both keep one priority. 0: the same priority.", minimum=0, maximum=19)
    options: Mapping[str, Any] = _doc(MappingProxyType({}), "Other [store] keys, for StoreConfig.")

    def store_config(self) -> Any:
        """The storage writer's ``StoreConfig`` (raises ``ConfigError`` on unknown keys)."""
        from storage.config import StoreConfig

        known = {f.name for f in dataclasses.fields(StoreConfig)} if dataclasses.is_dataclass(
            StoreConfig) else set(getattr(StoreConfig, "__struct_fields__", ()))
        unknown = set(self.options) - known
        if unknown:
            raise ConfigError(f"[store]: unknown key(s) {', '.join(sorted(unknown))} "
                              f"(known: dir, {', '.join(sorted(known))})")
        try:
            return StoreConfig(**self.options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[store]: {e}") from None


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """``[http]``: the HTTP(S) proxy (issue 4; started by the proxy service when present)."""

    enabled: bool = _doc(True, "Start the HTTP(S) proxy (when the proxy service is built in).")
    listen: str = _doc("127.0.0.1:8080", "Proxy listen address HOST:PORT.")
    mode: str = _doc("explicit", "\"explicit\" (clients configured to use the proxy) or "
                     "\"transparent\" (nftables redirects tcp 80/443 to it).",
                     choices=("explicit", "transparent"))
    request_hold_max: int = _doc(1 << 20, "Request body bytes held and scanned before anything "
                                 "reaches the server (a blocked post is never seen by it).",
                                 minimum=0)
    response_hold_max: int = _doc(1 << 20, "Scan window: text-like response bytes held back so a "
                                  "match can still be answered with the 451 block page.",
                                  minimum=0)
    over_cap: str = _doc("stream", "Past a hold cap: \"stream\" (forward, keep scanning, reset "
                         "the connection on a later block, record) or \"block\" (451).",
                         choices=("stream", "block"))
    scan_media: bool = _doc(False, "Scan image/audio/video/font/archive bodies too (default: "
                            "streamed untouched).")
    intercept: tuple[str, ...] = _doc((), "Domains whose HTTPS is intercepted for full inspection "
                                      "(suffix match; [\"*\"] = all); needs `linewarden ca init`. "
                                      "[] = SNI decisions only, TLS passed through.")
    passthrough: tuple[str, ...] = _doc((), "Domains never intercepted (pinned apps), even when "
                                        "`intercept` covers them.")
    ca_dir: str = _doc("./var/ca", "The interception CA (`linewarden ca init --dir`), used as "
                       "mitmproxy's confdir.")
    upstream_verify: bool = _doc(True, "Verify servers' certificates on intercepted connections.")
    blocked_by: str = _doc("", "URI naming the blocking unit, sent as the 451 page's "
                           "Link: rel=\"blocked-by\" header (RFC 7725); \"\" = none.")
    idle_timeout_s: float = _doc(300.0, "Seconds a keep-alive client connection may wait for its "
                                 "next request.", minimum=1.0)
    connect_timeout_s: float = _doc(10.0, "Seconds to connect to a server.", minimum=0.1)
    fail: str = _doc("open", "On an internal error during a decision: \"open\" (pass, record "
                     "the error) or \"closed\" (block).", choices=("open", "closed"))
    relay: str = _doc("auto", "How passed-through connections (TLS not intercepted, CONNECT "
                      "tunnels, WebSocket) are relayed: \"splice\" (splice(2): the bytes stay in "
                      "the kernel, the least CPU for the proxy), \"copy\" (through a buffer), or "
                      "\"auto\": splice between two other hosts, copy when one end is on this host "
                      "(the interception proxy), where splicing costs that end more than it saves "
                      "(proxy/relay.py).", choices=("auto", "splice", "copy"))
    native: bool = _doc(True, "Carry TLS passed through on a verdict already given (the same "
                        "CONNECT head, the same server name) in C (proxy/_passthrough.c): about "
                        "half the proxy's CPU for a new TLS connection; the same records. false: "
                        "the Python path carries every connection (also without a C compiler, "
                        "or with LINEWARDEN_PURE_PYTHON=1).")
    workers: int = _doc(1, "Proxy processes sharing the listen port (SO_REUSEPORT), each sending "
                        "its records to the main process's writer; 0 = in the main process. "
                        "One process uses one core.", minimum=0, maximum=16)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``[dns]``: the DNS shim (proxy/dns_shim.py)."""

    enabled: bool = _doc(True, "Start the DNS shim.")
    listen: str = _doc("127.0.0.1:5353", "UDP and TCP listen address HOST:PORT "
                       "(a gateway uses 0.0.0.0:53 or the LAN address).")
    upstreams: tuple[str, ...] = _doc((), "Upstream resolvers HOST:PORT, tried in this order "
                                      "(failover); [] = the first nameserver of /etc/resolv.conf.")
    timeout_ms: int = _doc(1500, "Time one upstream gets to answer one query before the next "
                           "one is tried.", minimum=10)
    fail_threshold: int = _doc(3, "Consecutive timeouts after which an upstream is marked down "
                               "(tried last until a health probe answers).", minimum=1)
    health_interval_s: float = _doc(5.0, "Seconds between health probes of upstreams marked down.",
                                    minimum=0.1)
    upstream_sockets: int = _doc(8, "UDP sockets (source ports) per upstream; replies must match "
                                 "a random id on a random port (RFC 5452).", minimum=1)
    cache_size: int = _doc(100_000, "Answers kept in the cache (LRU); 0 disables caching.",
                           minimum=0)
    cache_min_ttl: int = _doc(0, "Lower clamp of cached TTLs, seconds.", minimum=0)
    cache_max_ttl: int = _doc(86_400, "Upper clamp of cached TTLs, seconds.", minimum=0)
    cache_max_negative_ttl: int = _doc(900, "Upper clamp of negative (NXDOMAIN/NODATA) TTLs, "
                                       "seconds (RFC 2308).", minimum=0)
    block_ttl: int = _doc(60, "TTL of the shim's own block answers (NXDOMAIN has no SOA, so "
                          "clients do not cache it; sinkhole records carry this TTL).", minimum=0)
    strip_ech: bool = _doc(True, "Remove the `ech` SvcParam from HTTPS/SVCB answers so that "
                           "browsers send a cleartext SNI the proxy can check "
                           "(see deploy/README.md).")
    workers: int = _doc(1, "Processes answering DNS on one port (SO_REUSEPORT), each "
                        "sending its records to the writer in the main process; 0 = answer "
                        "in the main process. On 2 cores, 1 answers more cache hits and 2 more cache "
                        "misses (deploy/README.md, Measured; linewarden/workers.py explains "
                        "the processes).", minimum=0, maximum=16)
    tcp_idle_timeout_s: float = _doc(10.0, "Idle TCP client connections are closed after this "
                                     "(RFC 7766 6.2.3 recommends seconds, not minutes).",
                                     minimum=0.1)
    tcp_max_connections: int = _doc(512, "Concurrent TCP clients; more are refused (closed).",
                                    minimum=1)
    sinkhole: Mapping[str, tuple[str, ...]] = _doc(
        MappingProxyType({}), "[dns.sinkhole] category = [addresses]: blocked names of that "
        "category get these A/AAAA answers (the gateway serving the block page); other "
        "categories get NXDOMAIN.")

    def upstream_addresses(self) -> list[tuple[str, int]]:
        return [parse_hostport(u, 53) for u in self.upstreams]


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    rules: RulesConfig = field(default_factory=RulesConfig)
    store: StoreSection = field(default_factory=StoreSection)
    http: HttpConfig = field(default_factory=HttpConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    identity: tuple[Binding, ...] = ()
    """``[[identity.binding]]`` tables: ip (address or network), account, mac (optional)."""
    source: str | None = None
    """The file this came from (None: embedded defaults)."""

    def with_flags(
        self,
        *,
        rules: str | None = None,
        store: str | None = None,
        http_listen: str | None = None,
        dns_listen: str | None = None,
        dns_upstreams: list[str] | None = None,
        mode: str | None = None,
    ) -> Config:
        """Command-line flags override the file (None: flag not given)."""
        out = self
        if rules is not None:
            out = dataclasses.replace(out, rules=dataclasses.replace(out.rules, dir=rules))
        if store is not None:
            out = dataclasses.replace(out, store=dataclasses.replace(out.store, dir=store))
        http = out.http
        if http_listen is not None:
            http = dataclasses.replace(http, listen=_check_listen("--http-listen", http_listen, 8080))
        if mode is not None:
            if mode not in ("explicit", "transparent"):
                raise ConfigError(f"--mode: {mode!r} is not explicit or transparent")
            http = dataclasses.replace(http, mode=mode)
        dns = out.dns
        if dns_listen is not None:
            dns = dataclasses.replace(dns, listen=_check_listen("--dns-listen", dns_listen, 53))
        if dns_upstreams:
            dns = dataclasses.replace(dns, upstreams=tuple(
                _check_listen("--dns-upstream", u, 53) for u in dns_upstreams))
        return dataclasses.replace(out, http=http, dns=dns)

    def resolved_upstreams(self, resolv_conf: Path = RESOLV_CONF) -> tuple[str, ...]:
        """``dns.upstreams``, or the documented default (first nameserver of resolv.conf)."""
        if self.dns.upstreams:
            return self.dns.upstreams
        ns = resolv_conf_nameserver(resolv_conf)
        return (ns,) if ns else ()


def _check_listen(key: str, value: str, default_port: int) -> str:
    try:
        host, port = parse_hostport(value, default_port)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _convert(section: str, cls: type, table: Mapping[str, Any], skip: set[str] = set()) -> Any:
    """Check a TOML table against a dataclass's fields (type, choices, bounds)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(table) - set(fields) - skip
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(set(fields) - {'options'}))})")
    values: dict[str, Any] = {}
    for name, value in table.items():
        if name in skip:
            continue
        f = fields[name]
        default = f.default
        where = f"{section}.{name}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: expected a number, got {value!r}")
            value = float(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: expected a string, got {value!r}")
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
            value = tuple(value)
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
        if "minimum" in meta and value < meta["minimum"]:
            raise ConfigError(f"{where}: {value!r} is below the minimum {meta['minimum']}")
        if "maximum" in meta and value > meta["maximum"]:
            raise ConfigError(f"{where}: {value!r} is above the maximum {meta['maximum']}")
        values[name] = value
    return cls(**values)


def _sinkhole(table: Any) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(table, dict):
        raise ConfigError("[dns.sinkhole]: expected a table of category = [addresses]")
    out: dict[str, tuple[str, ...]] = {}
    for category, value in table.items():
        addrs = [value] if isinstance(value, str) else value
        if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
            raise ConfigError(f"dns.sinkhole.{category}: expected an address or a list of them")
        versions = []
        for a in addrs:
            try:
                versions.append(ipaddress.ip_address(a).version)
            except ValueError:
                raise ConfigError(f"dns.sinkhole.{category}: {a!r} is not an IP address") from None
        if versions.count(4) > 1 or versions.count(6) > 1:
            raise ConfigError(f"dns.sinkhole.{category}: at most one IPv4 and one IPv6 address")
        out[category] = tuple(addrs)
    return MappingProxyType(out)


def config_from_mapping(data: Mapping[str, Any], source: str | None = None) -> Config:
    """Build a ``Config`` from parsed TOML (raises ``ConfigError``)."""
    unknown = set(data) - {"rules", "store", "http", "dns", "identity"}
    if unknown:
        raise ConfigError(f"unknown table(s) {', '.join(sorted(unknown))} "
                          "(known: rules, store, http, dns, identity)")
    for name in ("rules", "store", "http", "dns", "identity"):
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(f"[{name}] must be a table")
    rules = _convert("rules", RulesConfig, data.get("rules", {}))
    store_t = dict(data.get("store", {}))
    store_dir = store_t.pop("dir", "./var")
    if not isinstance(store_dir, str) or not store_dir:
        raise ConfigError(f"store.dir: expected a non-empty string, got {store_dir!r}")
    nice = _convert("store", StoreSection, {"nice": store_t.pop("nice")} if "nice" in store_t else {}).nice
    store = StoreSection(store_dir, nice, MappingProxyType(store_t))
    http = _convert("http", HttpConfig, data.get("http", {}))
    dns_t = data.get("dns", {})
    dns = _convert("dns", DnsConfig, dns_t, skip={"sinkhole"})
    if "sinkhole" in dns_t:
        dns = dataclasses.replace(dns, sinkhole=_sinkhole(dns_t["sinkhole"]))
    _check_listen("http.listen", http.listen, 8080)
    _check_listen("dns.listen", dns.listen, 53)
    for i, u in enumerate(dns.upstreams):
        _check_listen(f"dns.upstreams[{i}]", u, 53)
    ident_t = data.get("identity", {})
    unknown = set(ident_t) - {"binding"}
    if unknown:
        raise ConfigError(f"[identity]: unknown key(s) {', '.join(sorted(unknown))} (known: binding)")
    bindings = []
    for i, entry in enumerate(ident_t.get("binding", [])):
        if not isinstance(entry, dict):
            raise ConfigError(f"identity.binding[{i}]: expected a table")
        try:
            bindings.append(parse_binding(entry))
        except ValueError as e:
            raise ConfigError(f"identity.binding[{i}]: {e}") from None
    return Config(rules, store, http, dns, tuple(bindings), source)


def load_config(path: str | Path | None) -> Config:
    """Read a TOML config file; None gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8") from None
    try:
        return config_from_mapping(data, str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def describe() -> str:
    """Every key with its default and meaning, as a Markdown table."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in (("rules", RulesConfig), ("store", StoreSection), ("http", HttpConfig),
                         ("dns", DnsConfig)):
        for f in dataclasses.fields(cls):
            if f.name == "options":
                continue
            default = f.default
            if isinstance(default, Mapping):
                default = {}
            shown = "[]" if default == () else repr(default).replace("'", '"').lower() \
                if isinstance(default, bool) else repr(default).replace("'", '"')
            key = "dns.sinkhole.CATEGORY" if f.name == "sinkhole" else f"{section}.{f.name}"
            rows.append(f"| `{key}` | `{shown}` | {f.metadata['doc']} |")
    rows.append("| `identity.binding` | `[]` | Array of tables {ip, account, mac}: static "
                "address/network → account (and MAC) bindings. |")
    return "\n".join(rows)
