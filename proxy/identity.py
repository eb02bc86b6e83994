"""Who is behind a client address: static ip → account (and MAC) bindings.

Owns: the lookup every live adapter does per flow (``account_for``, ``mac_for``)
and the validation of the ``[[identity.binding]]`` config entries. Must not:
read files or the network (the config loader hands the bindings over), decide
anything about traffic. Portal and RADIUS sessions (DESIGN.md "session") will
feed the same object later; for now bindings are static, as issue 4 asks.

A binding names one address (``10.0.0.23``) or a network (``10.0.1.0/24``);
an exact address wins over a network, and a longer prefix over a shorter one,
so a lab can be bound as a whole and one teacher's desk inside it apart.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LOOKUP_MEMO_MAX = 65_536
"""Client addresses whose (network or absent) binding is remembered; cleared when full."""
_UNBOUND = object()
_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")


@dataclass(frozen=True, slots=True)
class Binding:
    """One static binding from the config."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    """The address (as a /32 or /128) or network bound."""
    account: str
    """The account every flow from there is attributed to."""
    mac: str | None = None
    """The client's MAC address (lower case, colon-separated), when known."""


def parse_binding(entry: Mapping[str, object]) -> Binding:
    """One ``[[identity.binding]]`` table → ``Binding``; ``ValueError`` says what is wrong."""
    unknown = set(entry) - {"ip", "account", "mac"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} (known: ip, account, mac)")
    ip, account, mac = entry.get("ip"), entry.get("account"), entry.get("mac")
    if not isinstance(ip, str) or not ip:
        raise ValueError("'ip' must be an address or network, e.g. \"10.0.0.23\" or \"10.0.1.0/24\"")
    try:
        network = ipaddress.ip_network(ip, strict=True)
    except ValueError as e:
        raise ValueError(f"'ip' {ip!r} is not an address or network: {e}") from None
    if not isinstance(account, str) or not account.strip():
        raise ValueError(f"binding for {ip}: 'account' must be a non-empty string")
    if mac is not None:
        if not isinstance(mac, str) or not _MAC.match(mac.lower()):
            raise ValueError(f"binding for {ip}: 'mac' {mac!r} is not like 02:00:00:00:00:01")
        mac = mac.lower().replace("-", ":")
    return Binding(network, account.strip(), mac)


class Identity:
    """Immutable lookup table built once from the bindings (swapped whole on reload)."""

    __slots__ = ("_exact", "_networks", "_memo")

    def __init__(self, bindings: Iterable[Binding] = ()) -> None:
        exact: dict[str, Binding] = {}
        networks: list[Binding] = []
        for b in bindings:
            if b.network.num_addresses == 1:
                key = str(b.network.network_address)
                if key in exact:
                    raise ValueError(f"address {key} is bound twice")
                exact[key] = b
            else:
                networks.append(b)
        # Longest prefix first: the first network containing the address wins.
        networks.sort(key=lambda b: b.network.prefixlen, reverse=True)
        self._exact = exact
        self._networks = tuple(networks)
        self._memo: dict[str, Binding | None] = {}
        """Answers for addresses not bound exactly (parsing an address is the slow part)."""

    @classmethod
    def from_config(cls, bindings: Iterable[Mapping[str, object] | Binding]) -> Identity:
        """From ``[[identity.binding]]`` tables (or ready ``Binding``s)."""
        out = []
        for i, entry in enumerate(bindings):
            if isinstance(entry, Binding):
                out.append(entry)
                continue
            try:
                out.append(parse_binding(entry))
            except ValueError as e:
                raise ValueError(f"identity.binding[{i}]: {e}") from None
        return cls(out)

    def lookup(self, ip: str) -> Binding | None:
        b = self._exact.get(ip)
        if b is not None:
            return b
        b = self._memo.get(ip, _UNBOUND)
        if b is not _UNBOUND:
            return b  # type: ignore[return-value]
        b = self._search(ip)
        if len(self._memo) >= LOOKUP_MEMO_MAX:
            self._memo.clear()
        self._memo[ip] = b
        return b

    def _search(self, ip: str) -> Binding | None:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            # A dual-stack socket reports v4 clients as ::ffff:a.b.c.d.
            mapped = str(addr.ipv4_mapped)
            if mapped in self._exact:
                return self._exact[mapped]
            addr = addr.ipv4_mapped
        for b in self._networks:
            if addr.version == b.network.version and addr in b.network:
                return b
        return None

    def account_for(self, ip: str) -> str | None:
        b = self.lookup(ip)
        return b.account if b else None

    def mac_for(self, ip: str) -> str | None:
        b = self.lookup(ip)
        return b.mac if b else None

    def __len__(self) -> int:
        return len(self._exact) + len(self._networks)
