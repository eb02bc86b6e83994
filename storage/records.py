"""The record schema, declared once (DESIGN.md "Records", STYLE.md 8).

Every record kind is one frozen ``msgspec.Struct``; its JSON form (flat,
snake_case, ``kind`` as the tag) is the one that ``query --json``, ``export``
and the uplink use. SQL columns and the README's field reference are derived
from these classes, so a field is added here and nowhere else.

Times are integers: microseconds since the Unix epoch, UTC. Adapters pass the
time they were given (packet time in a replay), never ``time.time()`` here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

Action = Literal["allow", "block", "log"]


class Record(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", omit_defaults=False, gc=False):
    """Fields every record carries.

    ``gc=False``: a record holds only scalars and lists of strings, so it can never be part
    of a reference cycle, and the cyclic GC need not track it. The writer's queue holds up
    to ``queue_max`` of them; tracked, every collection walked them all (measured: ~6 % of
    the main process's CPU at 60k DNS records/s)."""

    ts: int
    """When it happened: microseconds since the Unix epoch, UTC."""
    uid: str = ""
    """Connection id shared by the records of one connection (conn, http, tls, dns)."""
    account: str | None = None
    """The user's account (from identity bindings), when known."""
    client_ip: str | None = None
    """The client's internal address."""
    client_port: int | None = None
    """The client's source port."""
    client_mac: str | None = None
    """The client's MAC address, when known."""
    nat_ip: str | None = None
    """Egress side of the upstream connection: local address of the upstream socket."""
    nat_port: int | None = None
    """Egress side of the upstream connection: local port of the upstream socket."""
    server_ip: str | None = None
    """The server's address."""
    server_port: int | None = None
    """The server's port."""
    action: Action = "allow"
    """``allow``, ``block`` or ``log``: what linewarden did."""
    rule_ids: list[str] = msgspec.field(default_factory=list)
    """Ids of the rules that fired."""
    ruleset_version: int | None = None
    """Version of the rule set that decided."""
    community_id: str | None = None
    """Community ID flow hash (v1), as Zeek and Suricata compute it, to join with their logs."""

    KINDS: ClassVar[dict[str, type["Record"]]] = {}


class Conn(Record, frozen=True, kw_only=True, tag="conn"):
    """One TCP or UDP connection through the gateway."""

    proto: str = "tcp"
    """Transport protocol: ``tcp`` or ``udp``."""
    service: str | None = None
    """Application protocol seen: ``http``, ``tls``, ``dns`` or None."""
    ts_end: int | None = None
    """When the connection closed (µs since epoch, UTC)."""
    bytes_up: int = 0
    """Payload bytes client → server."""
    bytes_down: int = 0
    """Payload bytes server → client."""
    close_reason: str | None = None
    """Why it ended: ``fin``, ``rst``, ``timeout``, ``blocked``, ``error: ...``."""
    dns_name: str | None = None
    """The name this client last resolved to ``server_ip`` through the DNS shim."""


class Http(Record, frozen=True, kw_only=True, tag="http"):
    """One HTTP request/response transaction."""

    method: str | None = None
    """Request method."""
    host: str | None = None
    """Host header (or authority of an absolute-form target)."""
    url: str | None = None
    """Request target as sent (path and query, or absolute form)."""
    status: int | None = None
    """Response status code; None when no response (blocked before the server)."""
    content_type: str | None = None
    """Response Content-Type."""
    req_bytes: int = 0
    """Request body bytes."""
    resp_bytes: int = 0
    """Response body bytes."""
    user_agent: str | None = None
    """User-Agent header."""
    referrer: str | None = None
    """Referer header."""
    category: str | None = None
    """Category of the first matched rule."""
    keyword: str | None = None
    """The keyword, domain or URL pattern of the first matched rule."""
    snippet: str | None = None
    """Context around the match (normalised text)."""
    evidence: str | None = None
    """The blocked body's decoded text, capped; only on blocks."""


class Tls(Record, frozen=True, kw_only=True, tag="tls"):
    """One TLS handshake as seen in the ClientHello."""

    sni: str | None = None
    """server_name from the ClientHello."""
    alpn: list[str] = msgspec.field(default_factory=list)
    """ALPN protocols offered."""
    tls_version: str | None = None
    """Highest version offered (``TLSv1.3``...)."""
    intercepted: bool = False
    """True when linewarden terminated TLS to inspect HTTP; False for passthrough."""


class Dns(Record, frozen=True, kw_only=True, tag="dns"):
    """One DNS query and its answer."""

    qname: str | None = None
    """The queried name as sent (case preserved)."""
    qtype: int | None = None
    """Query type code."""
    qtype_name: str | None = None
    """Query type name (``A``, ``AAAA``...)."""
    rcode: int | None = None
    """Response code; None when no response."""
    rcode_name: str | None = None
    """Response code name (``NOERROR``, ``NXDOMAIN``...)."""
    answers: list[str] = msgspec.field(default_factory=list)
    """Answer records' data (addresses, CNAME targets...)."""
    dns_id: int | None = None
    """The DNS message id."""
    transport: str = "udp"
    """``udp`` or ``tcp``."""
    cache_hit: bool = False
    """Answered from the shim's cache."""
    latency_us: int | None = None
    """Time from query to answer, microseconds."""


class Session(Record, frozen=True, kw_only=True, tag="session"):
    """A user's login session on the line."""

    phone: str | None = None
    """Calling number."""
    method: str | None = None
    """``portal``, ``static`` or ``radius``."""
    login_ts: int | None = None
    """Login time (µs since epoch, UTC)."""
    logout_ts: int | None = None
    """Logout time, None while logged in."""
    reason: str | None = None
    """Why the session ended."""


class Registration(Record, frozen=True, kw_only=True, tag="registration"):
    """A user's registration (personal data: access-controlled)."""

    real_name: str | None = None
    """The user's real name."""
    id_type: str | None = None
    """Kind of identity document."""
    id_number: str | None = None
    """Identity document number."""
    phone: str | None = None
    """Phone number."""
    registered_at: int | None = None
    """Registration time (µs since epoch, UTC)."""


class Maintenance(Record, frozen=True, kw_only=True, tag="maintenance"):
    """An administrative change made through any interface."""

    admin: str | None = None
    """Who made the change."""
    operation: str | None = None
    """What was done (``rules.push``, ``rules.rollback``, ``backup.restore``...)."""
    target: str | None = None
    """What it was done to."""
    result: str | None = None
    """``ok`` or the error."""
    source_ip: str | None = None
    """Where the admin came from (``local`` for the control socket)."""


class Alarm(Record, frozen=True, kw_only=True, tag="alarm"):
    """Something the alarm centre must hear about."""

    alarm_kind: str = ""
    """``illegal_content``, ``service_stopped``, ``disk_low``, ``rules_reloaded``,
    ``rules_rejected``, ``integrity_failure``, ``queue_overflow``."""
    detail: str | None = None
    """Human-readable detail."""


RECORD_TYPES: tuple[type[Record], ...] = (Conn, Http, Tls, Dns, Session, Registration, Maintenance, Alarm)
AnyRecord = Conn | Http | Tls | Dns | Session | Registration | Maintenance | Alarm
for _t in RECORD_TYPES:
    Record.KINDS[_t.__struct_config__.tag] = _t  # type: ignore[index]
