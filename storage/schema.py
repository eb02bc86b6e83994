"""The on-disk form of records, derived from the Structs of storage/records.py.

Strategy (chosen for <= 150 bytes per record and the two indexed queries):

* One table ``rec`` per day file with one column per common ``Record`` field, plus
  ``kind``, ``domain`` (the kind's name field: conn.dns_name, http.host, tls.sni,
  dns.qname) and ``x``, a msgpack array of the kind-specific fields.
* Lossless compaction, each undone on read: canonical IPv4 -> INTEGER, canonical IPv6 ->
  16-byte BLOB (anything else is kept as TEXT); action -> small int; repetitive strings
  (account, MAC, domain, user agent, ...) interned in ``strs`` and referenced by id; a
  ``community_id`` equal to the hash of the record's own 5-tuple -> the integer 1;
  ``ts_end`` as a delta from ``ts``; trailing default values of ``x`` trimmed.
* Columns have no declared type, so SQLite applies no affinity: what is written is read.
* Indexes: (account) and (domain), partial (NULL rows cost nothing). Time ranges
  use the per-batch min/max ts of ``batches`` to narrow the rowid range instead of a third
  index.
* Each file stores its own kind layouts (``kinds``: code -> tag and field list), so a day
  written by an older version decodes with the fields it was written with, and the chain
  hash is over those logical values, not over today's Struct.

Owns encoding and decoding of rows. Must not open files, commit, or know HTTP/DNS parsing.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

import msgspec

from struct import error as struct_error

from storage.chain import frame
from storage import hits
from storage.communityid import community_id
from storage.hits import Template
from storage.records import RECORD_TYPES, Action, Record

try:
    from storage import _copies
except ImportError:  # built without a C compiler: Python builds the rows of Copies
    _copies = None
if os.environ.get("LINEWARDEN_PURE_PYTHON", "") not in ("", "0"):
    _copies = None

FORMAT_VERSION = 2
"""Bumped when the table layout changes; stored in each file's ``meta``. 2 added
``protos`` and ``runs`` (storage/runs.py); a format 1 file has neither and reads as before."""

ACTIONS: tuple[str, ...] = get_args(Action)
RECORD_FIELDS: tuple[str, ...] = Record.__struct_fields__
COLUMNS: tuple[str, ...] = ("id", "kind", *RECORD_FIELDS, "domain", "x")

IP_FIELDS = frozenset({"client_ip", "nat_ip", "server_ip"})
INTERNED = frozenset({
    "account", "client_mac", "rule_ids", "user_agent", "content_type", "referrer", "alpn", "category",
    "qtype_name", "rcode_name", "tls_version", "service", "method", "close_reason", "proto", "transport",
    "admin", "operation", "result", "alarm_kind", "id_type",
})
"""Fields whose values repeat a lot within a day: stored once per day file, referenced by id."""
DELTA_FIELDS = frozenset({"ts_end"})
"""Times stored as an offset from ``ts`` (a few bytes instead of eight)."""
DOMAIN_FIELD: dict[str, str] = {"conn": "dns_name", "http": "host", "tls": "sni", "dns": "qname"}
"""The one field per kind that ``--domain`` matches; it lives in the indexed ``domain`` column."""
CID_DERIVED = 1
"""Stored in ``community_id`` when the value equals the hash of the record's own 5-tuple."""

DDL = [
    "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS kinds(code INTEGER PRIMARY KEY, tag TEXT NOT NULL, fields TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS strs(id INTEGER PRIMARY KEY, v NOT NULL UNIQUE, rkey)",
    "CREATE INDEX IF NOT EXISTS strs_rkey ON strs(rkey) WHERE rkey IS NOT NULL",
    f"CREATE TABLE IF NOT EXISTS rec({', '.join(c if c != 'id' else 'id INTEGER PRIMARY KEY' for c in COLUMNS)})",
    # Keyed by the interned id alone: the rows of one account (or name) in a day number in
    # the hundreds to thousands and are sorted after the lookup; leaving ts out of the key
    # saves ~14 bytes a record over (account, ts) + (domain, ts).
    "CREATE INDEX IF NOT EXISTS rec_account ON rec(account) WHERE account IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS rec_domain ON rec(domain) WHERE domain IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS batches(n INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, "
    "last_id INTEGER NOT NULL, min_ts INTEGER NOT NULL, max_ts INTEGER NOT NULL, hash BLOB NOT NULL)",
    # Runs of copies (storage/runs.py): a prototype's row once in ``protos`` (the columns of
    # ``rec``), its copies' varying values packed in one ``runs`` row.
    f"CREATE TABLE IF NOT EXISTS protos({', '.join(c if c != 'id' else 'id INTEGER PRIMARY KEY' for c in COLUMNS)})",
    # No index on proto: a commit's runs name a thousand prototypes, and an index on them
    # took a page write each (measured: the store slowed as the day grew). A query scans
    # ``runs``, kept lean (~30 bytes a run) by holding the values apart in ``run_data``.
    "CREATE TABLE IF NOT EXISTS runs(first_id INTEGER PRIMARY KEY, proto INTEGER NOT NULL, companion INTEGER, "
    "count INTEGER NOT NULL, min_ts INTEGER NOT NULL, max_ts INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS run_data(first_id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
]
RUN_COLUMNS = ("first_id", "proto", "companion", "count", "min_ts", "max_ts")
RUN_DATA_COLUMNS = ("first_id", "data")
UPDATE_RKEY = "UPDATE strs SET rkey = ? WHERE id = ?"
INSERT_BATCH = "INSERT INTO batches(n, first_id, last_id, min_ts, max_ts, hash) VALUES (?, ?, ?, ?, ?, ?)"

ROWS_PER_INSERT = 512
"""Most rows per multi-row INSERT (512 x 18 = 9216 parameters, under SQLite's 32766)."""


@functools.lru_cache(maxsize=64)
def multi_insert_sql(table: str, columns: tuple[str, ...], n: int) -> str:
    """``INSERT INTO table(columns) VALUES (?, ...), ...`` with ``n`` rows."""
    one = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table}({', '.join(columns)}) VALUES " + ", ".join([one] * n)


def chunk_plan(n: int) -> list[tuple[int, int, int]]:
    """How ``n`` rows go in: (rows per statement, first row, end row) runs, statements of
    ``ROWS_PER_INSERT`` rows and then one each of 256, 128, ... 1 rows for the rest.

    Why: the SQL thread releases the GIL once per statement. With one row a statement that
    is once per row, and under load each re-acquisition can wait a whole switch interval
    (5 ms) while the event loop holds the GIL; this way it is at most a dozen times per
    batch, and the few distinct statement sizes stay in the statement cache."""
    full = n - n % ROWS_PER_INSERT
    out = [(ROWS_PER_INSERT, 0, full)] if full else []
    k, size = full, ROWS_PER_INSERT // 2
    while k < n:
        while size > n - k:
            size //= 2
        out.append((size, k, k + size))
        k += size
    return out


def insert_statements(table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
    """(sql, flat params) inserting ``rows`` in the statements of ``chunk_plan``."""
    return [(multi_insert_sql(table, columns, size), list(itertools.chain.from_iterable(rows[k:k + size])))
            for size, lo, hi in chunk_plan(len(rows)) for k in range(lo, hi, size)]


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def domain_key(name: str) -> str:
    """Reversed, lower-cased labels without the trailing dot: ``www.Example.com.`` ->
    ``com.example.www``; a suffix query becomes a range scan on an index."""
    return ".".join(reversed(name.rstrip(".").lower().split(".")))


# --- addresses -------------------------------------------------------------------------

_ip_cache: dict[str, int | bytes | str] = {}


IPV4_OFFSET = 2**31
"""IPv4 is stored as its 32-bit value minus 2**31: every address then fits SQLite's 4-byte
integer (203.0.113.1 would otherwise take 6 bytes)."""


def ipv4_db(value: int) -> int:
    return value - IPV4_OFFSET


def ip_to_db(ip: str) -> int | bytes | str:
    """Canonical IPv4 -> int (offset), canonical IPv6 -> 16 bytes, anything else unchanged (lossless)."""
    v = _ip_cache.get(ip)
    if v is not None:
        return v
    out: int | bytes | str = ip
    try:
        packed = socket.inet_pton(socket.AF_INET, ip)
        if socket.inet_ntop(socket.AF_INET, packed) == ip:
            out = int.from_bytes(packed) - IPV4_OFFSET
    except (OSError, TypeError, ValueError):
        try:
            packed = socket.inet_pton(socket.AF_INET6, ip)
            if socket.inet_ntop(socket.AF_INET6, packed) == ip:
                out = packed
        except (OSError, TypeError, ValueError):  # ValueError: embedded NUL
            pass
    if len(_ip_cache) > 200_000:  # bounded: a scan of random sources must not grow it forever
        _ip_cache.clear()
    _ip_cache[ip] = out
    return out


def ip_from_db(v: int | bytes | str | None) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return socket.inet_ntop(socket.AF_INET, (v + IPV4_OFFSET).to_bytes(4))
    return socket.inet_ntop(socket.AF_INET6, v)


# --- layouts -----------------------------------------------------------------------------


@functools.cache
def _defaults_of(cls: type[Record]) -> dict[str, Any]:
    """Field defaults of a Struct (msgspec.structs.fields evaluates annotations: slow, so once)."""
    out: dict[str, Any] = {}
    for f in msgspec.structs.fields(cls):
        if f.default is not msgspec.NODEFAULT:
            out[f.name] = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = msgspec.NODEFAULT
    return out


def _default(cls: type[Record], name: str) -> Any:
    d = _defaults_of(cls)[name]
    return list(d) if isinstance(d, list) else d


@dataclass(frozen=True, slots=True)
class Layout:
    """How one kind's records are laid out in one day file."""

    code: int
    tag: str
    fields: tuple[str, ...]
    """Every field of the kind, in Struct order, as when the file was written."""
    specific: tuple[str, ...]
    """Fields kept in ``x`` (not columns, not the domain field)."""
    stored_defaults: tuple[Any, ...]
    """What each ``x`` entry holds when the field has its default (trimmed at the end)."""
    defaults: dict[str, Any]
    domain_field: str | None

    @property
    def cls(self) -> type[Record] | None:
        return Record.KINDS.get(self.tag)


def make_layout(code: int, tag: str, fields: Iterable[str]) -> Layout:
    fields = tuple(fields)
    cls = Record.KINDS.get(tag)
    dom = DOMAIN_FIELD.get(tag)
    specific = tuple(f for f in fields if f not in RECORD_FIELDS and f != dom)
    defaults = {f: _default(cls, f) for f in fields if cls is not None and f in cls.__struct_fields__}
    stored = tuple(None if (f in INTERNED or f in DELTA_FIELDS) else defaults.get(f) for f in specific)
    return Layout(code, tag, fields, specific, stored, defaults, dom if dom in fields else None)


def current_fields(cls: type[Record]) -> tuple[str, ...]:
    return cls.__struct_fields__


def current_layouts() -> dict[str, tuple[str, ...]]:
    return {t.__struct_config__.tag: current_fields(t) for t in RECORD_TYPES}  # type: ignore[misc]


def load_layouts(conn: sqlite3.Connection) -> dict[int, Layout]:
    return {
        code: make_layout(code, tag, msgspec.json.decode(fields))
        for code, tag, fields in conn.execute("SELECT code, tag, fields FROM kinds")
    }


# --- interning ---------------------------------------------------------------------------


class Interner:
    """value -> id of one day file's ``strs``; new entries are collected for the next commit."""

    def __init__(self, rows: Iterable[tuple[int, Any, Any]] = ()) -> None:
        self.ids: dict[str | bytes, int] = {}
        self.domain_ids: set[int] = set()
        self.load(rows)

    def load(self, rows: Iterable[tuple[int, Any, Any]]) -> None:
        """(Re)fill from the file's ``strs`` rows, in place: compiled encoders hold ``ids``."""
        self.ids.clear()
        self.domain_ids.clear()
        self.next_id = 1
        for i, v, rkey in rows:
            self.ids[v] = i
            if rkey is not None:
                self.domain_ids.add(i)
            self.next_id = max(self.next_id, i + 1)
        self.new: list[tuple[int, Any, Any]] = []
        self.new_rkeys: list[tuple[str, int]] = []

    def id(self, value: str | list[str]) -> int:
        key: str | bytes = value if isinstance(value, str) else _enc.encode(value)
        i = self.ids.get(key)
        if i is None:
            i = self.ids[key] = self.next_id
            self.next_id += 1
            self.new.append((i, key, None))
        return i

    def domain_id(self, name: str) -> int:
        i = self.id(name)
        if i not in self.domain_ids:
            self.domain_ids.add(i)
            if self.new and self.new[-1][0] == i:
                self.new[-1] = (i, name, domain_key(name))
            else:
                self.new_rkeys.append((domain_key(name), i))
        return i

    def take(self) -> tuple[list[tuple[int, Any, Any]], list[tuple[str, int]]]:
        new, rk = self.new, self.new_rkeys
        self.new, self.new_rkeys = [], []
        return new, rk


def unintern(v: str | bytes) -> str | list[str]:
    return v if isinstance(v, str) else _dec.decode(v)


# --- encoding ----------------------------------------------------------------------------


class BadRecord(TypeError):
    """A record whose field types the store cannot keep losslessly (the producer's bug)."""


def _int_or_none(v: Any, name: str) -> Any:
    if v is None or type(v) is int:
        return v
    raise BadRecord(f"{name} must be an int or None, not {type(v).__name__}")


def _str_or_none(v: Any, name: str) -> Any:
    if v is None or type(v) is str:
        return v
    raise BadRecord(f"{name} must be a str or None, not {type(v).__name__}")


def _action_col(v: Any) -> Any:
    try:
        return ACTIONS.index(v)
    except ValueError:
        if type(v) is str:
            return v
        raise BadRecord(f"action must be a str, not {type(v).__name__}") from None


def _cid_col(cid: Any, proto: Any, cip: Any, cport: Any, sip: Any, sport: Any) -> Any:
    if cid is None:
        return None
    if type(cid) is not str:
        raise BadRecord(f"community_id must be a str or None, not {type(cid).__name__}")
    if proto is not None and cip is not None and sip is not None:
        try:
            if community_id(proto, cip, cport, sip, sport) == cid:
                return CID_DERIVED
        except (ValueError, KeyError, TypeError, OSError, struct_error):
            pass
    return cid


def _ip_src(var: str, out: str, field: str) -> str:
    """Source of the encoder's address packing (cached: a line has few distinct addresses)."""
    return f"""    if {var} is not None:
        if type({var}) is not str:
            raise BadRecord("{field} must be a str")
        {out} = IPC.get({var})
        if {out} is None:
            {out} = ip_to_db({var})
    else:
        {out} = None
"""


def _compile_encoder(lay: Layout, interner: Interner) -> Callable[[Record, int], tuple[tuple[Any, ...], bytes]]:
    """Generate the per-kind encoding function: straight-line code, no per-field dispatch
    (this is the writer's hot loop: every call saved per record is GIL time given back to
    the event loop and the data path)."""
    cls = lay.cls
    assert cls is not None and tuple(cls.__struct_fields__) == lay.fields, "encoders are for current layouts only"
    ix = {f: i for i, f in enumerate(lay.fields)}

    def t(name: str) -> str:
        return f"t[{ix[name]}]"

    proto = {"conn": t("proto") if "proto" in ix else "None", "dns": t("transport") if "transport" in ix else "None",
             "http": "'tcp'", "tls": "'tcp'"}.get(lay.tag, "None")
    xs = []
    for name in lay.specific:
        d = lay.defaults[name]
        if name in INTERNED:
            if isinstance(d, list):
                xs.append(f"(None if type({t(name)}) is list and not {t(name)} else intern({t(name)}))")
            elif d is None:
                xs.append(f"(None if {t(name)} is None else (IDS.get({t(name)}) or intern({t(name)})))")
            else:
                xs.append(f"(None if {t(name)} == D_{name} and type({t(name)}) is type(D_{name}) else intern({t(name)}))")
        elif name in DELTA_FIELDS:
            xs.append(f"(None if {t(name)} is None else _int_or_none({t(name)}, {name!r}) - ts)")
        else:
            xs.append(t(name))
    dom = "None"
    if lay.domain_field:
        d = t(lay.domain_field)
        # Known domain names (the common case) are one dict and one set lookup, no call.
        dom = f"(None if {d} is None else i if (i := IDS.get({d})) in DOMS else dintern(_str_or_none({d}, {lay.domain_field!r})))"
    src = f"""
def encode(rec, row_id):
    t = astuple(rec)
    ts = t[{ix['ts']}]
    if type(ts) is not int:
        raise BadRecord("ts must be an int (microseconds since the epoch)")
    logical = ENC((TAG, t))
    cip = t[{ix['client_ip']}]
    sip = t[{ix['server_ip']}]
    nip = t[{ix['nat_ip']}]
    cport = t[{ix['client_port']}]
    sport = t[{ix['server_port']}]
    nport = t[{ix['nat_port']}]
    rsv = t[{ix['ruleset_version']}]
    uid = t[{ix['uid']}]
    if ((cport is not None and type(cport) is not int) or (sport is not None and type(sport) is not int)
            or (nport is not None and type(nport) is not int) or (rsv is not None and type(rsv) is not int)
            or type(uid) is not str):
        raise BadRecord("ports and ruleset_version must be int or None, uid a str")
{_ip_src("cip", "cdb", "client_ip")}{_ip_src("sip", "sdb", "server_ip")}{_ip_src("nip", "ndb", "nat_ip")}    rules = {t('rule_ids')}
    x = [{', '.join(xs)}]
    while x and x[-1] == SD[len(x) - 1] and type(x[-1]) is type(SD[len(x) - 1]):
        x.pop()
    a = {t('account')}
    mac = {t('client_mac')}
    act = ACT.get({t('action')})
    return (
        row_id, CODE, ts, uid,
        None if a is None else (IDS.get(a) or intern(a)),
        cdb, cport,
        None if mac is None else (IDS.get(mac) or intern(mac)),
        ndb, nport,
        sdb, sport,
        _action_col({t('action')}) if act is None else act,
        None if type(rules) is list and not rules else intern(rules),
        rsv,
        _cid_col({t('community_id')}, {proto}, cip, cport, sip, sport),
        {dom},
        ENC(x) if x else None,
    ), logical
"""
    ns: dict[str, Any] = {
        "astuple": msgspec.structs.astuple, "ENC": _enc.encode, "TAG": lay.tag, "CODE": lay.code,
        "SD": lay.stored_defaults, "intern": interner.id, "dintern": interner.domain_id, "DOMS": interner.domain_ids,
        "BadRecord": BadRecord, "_str_or_none": _str_or_none, "_int_or_none": _int_or_none,
        "_action_col": _action_col, "_cid_col": _cid_col,
        "IPC": _ip_cache, "ip_to_db": ip_to_db, "IDS": interner.ids, "ACT": {a: i for i, a in enumerate(ACTIONS)},
    }
    ns.update({f"D_{k}": v for k, v in lay.defaults.items()})
    exec(compile(src, f"<storage.schema encoder {lay.tag}>", "exec"), ns)
    return ns["encode"]


class RowEncoder:
    """Record -> (row tuple for ``rec``, logical bytes hashed into the chain).

    Raises ``BadRecord`` (a TypeError) for a field of a type the store cannot keep
    losslessly; msgspec's ``EncodeError`` for a value it cannot serialise at all."""

    def __init__(self, layouts: dict[str, Layout], interner: Interner) -> None:
        self.layouts = layouts
        self.interner = interner
        self._by_type = {lay.cls: _compile_encoder(lay, interner) for lay in layouts.values()}
        self._plans: dict[int, tuple[Any, ...]] = {}
        """id(prototype) -> its copy plan (``_plan``); the prototype is held in the plan,
        so an id is never reused while its plan is here."""
        self._cplans: dict[int, tuple[Any, ...]] = {}
        """id(prototype) -> the C code's plan (``_c_plan``), the prototype held likewise."""
        self._protos: dict[int, tuple[Any, Any, int, int | None]] = {}
        """id(prototype) -> (prototype, companion, their ids in ``protos``)."""
        self._new_protos: list[tuple[Any, ...]] = []
        self.next_proto = 1
        """Id of the next ``protos`` row (the writer sets it from the file)."""

    def encode(self, rec: Record, row_id: int) -> tuple[tuple[Any, ...], bytes]:
        fn = self._by_type.get(type(rec))
        if fn is None:
            raise BadRecord(f"not a record kind this store knows: {type(rec).__name__}")
        return fn(rec, row_id)

    def encode_copies(self, copies: Copies, row_id: int, out: list[bytes]) -> Iterator[tuple[Any, ...]]:
        """Rows of ``copies`` from ``row_id`` on (a companion right after its copy); each
        row's logical bytes are appended to ``out``. The same rows and bytes as ``encode``
        of ``copies.records()``, built from each prototype's encoding once: in C
        (``storage._copies``) where it is built, else here."""
        entries = copies.entries
        i, n = 0, len(entries)
        planned = -1
        while i < n:
            if _copies is not None:
                rows, i = _copies.rows(entries, i, self._cplans, row_id, out)
                row_id += len(rows)
                yield from rows
                if i >= n:
                    return
                if planned != i:  # C stopped here: a prototype it has no plan for yet
                    planned = i
                    if self._c_plan(entries[i][0], entries[i][1])[2] is not None:
                        continue
            for row in self._encode_one(entries[i], row_id, out):
                row_id += 1
                yield row
            i += 1

    def runnable(self, proto: Record, companion: Record | None) -> bool:
        """Whether copies of ``proto`` (and ``companion``) can be kept as a run
        (storage/runs.py): only where their rows differ from the prototype's in the
        varying fields alone, which is where a plan exists."""
        return self._plan_for(proto, companion)[1] is not None

    def encode_run(self, entries: list[tuple[Any, ...]], row_id: int) -> tuple[int, int | None, bytes, bytes]:
        """A run of ``entries`` (copies of one runnable prototype and companion, in ts
        order; storage/runs.py): the ids of the ``protos`` rows holding the prototype
        and its companion (new ones are kept for ``take_protos``), the run's ``data``,
        and its copies' logical bytes as the chain hashes them (``chain.frame``: exactly
        those of their rows, from ``row_id`` on). In C (``storage._copies.run``) where
        it is built."""
        proto, companion = entries[0][0], entries[0][1]
        got = None
        if _copies is not None:
            plan = self._cplans.get(id(proto))
            if plan is None or plan[0] is not proto or plan[1] is not companion:
                self._c_plan(proto, companion)
            got = _copies.run(entries, self._cplans)
        if got is None:
            logical: list[bytes] = []
            for _ in self.encode_copies(Copies(entries, 0, 0, 0), row_id, logical):
                pass
            got = (_enc.encode([e[2:] for e in entries]), frame(logical))
        return (*self._proto_ids(proto, companion), *got)

    def encode_hit_run(self, packs: list[tuple[bytes, dict[int, Template]]], at: bytes, proto: Record,
                       companion: Record | None) -> tuple[int, int | None, bytes, bytes, int, int, int] | None:
        """``encode_run`` of one group of ``group_hits`` (copies kept packed), in C:
        (protos ids, data, framed, copies, least ts, greatest ts); None where C cannot
        (the group's entries then take ``encode_run``)."""
        if _copies is None:
            return None
        plan = self._cplans.get(id(proto))
        if plan is None or plan[0] is not proto or plan[1] is not companion:
            self._c_plan(proto, companion)
        got = _copies.run_hits(packs, at, self._cplans)
        if got is None:
            return None
        return (*self._proto_ids(proto, companion), *got)

    def _proto_ids(self, proto: Record, companion: Record | None) -> tuple[int, int | None]:
        got = self._protos.get(id(proto))
        if got is None or got[0] is not proto or got[1] is not companion:
            if len(self._protos) >= COPY_PLANS_MAX:
                self._protos.clear()
            pid = self.next_proto
            cpid = pid + 1 if companion is not None else None
            self.next_proto += 1 if companion is None else 2
            self._new_protos.append(self.encode(proto, pid)[0])
            if companion is not None:
                self._new_protos.append(self.encode(companion, pid + 1)[0])
            got = self._protos[id(proto)] = (proto, companion, pid, cpid)
        return got[2], got[3]

    def take_protos(self) -> list[tuple[Any, ...]]:
        """``protos`` rows made since the last call (for the transaction's INSERT)."""
        new, self._new_protos = self._new_protos, []
        return new

    def forget_protos(self, next_proto: int) -> None:
        """After a rollback: the rows made since the last commit are not in the file."""
        self._protos.clear()
        self._new_protos = []
        self.next_proto = next_proto

    def _encode_one(self, entry: tuple[Any, ...], row_id: int, out: list[bytes]) -> Iterator[tuple[Any, ...]]:
        proto, companion, ts, uid, port, dns_id, latency = entry
        plan = self._plan_for(proto, companion)
        if plan[1] is None:
            # No plan for this prototype (see _plan): the general encoder, record by record.
            for rec in Copies.expand_one(proto, companion, ts, uid, port, dns_id, latency):
                row, lg = self.encode(rec, row_id)
                row_id += 1
                out.append(lg)
                yield row
            return
        enc = _enc.encode
        r, t0, x0, sd, ix = plan[1], plan[3], plan[4], plan[5], plan[6]
        t = t0.copy()
        t[ix[0]] = ts
        t[ix[1]] = uid
        t[ix[2]] = port
        t[ix[3]] = dns_id
        t[ix[4]] = latency
        x = x0.copy()
        x[ix[5]] = dns_id
        x[ix[6]] = latency
        while x and x[-1] == sd[len(x) - 1] and type(x[-1]) is type(sd[len(x) - 1]):
            x.pop()
        out.append(enc((r[1], t)))
        yield (row_id, r[0], ts, uid, r[2], r[3], port, r[4], r[5], r[6], r[7], r[8], r[9], r[10],
               r[11], None, r[12], enc(x) if x else None)
        if companion is not None:
            cp = plan[7]
            ar, at0, ax, aix = cp[1], cp[3], cp[4], cp[6]
            at = at0.copy()
            at[aix[0]] = ts
            at[aix[1]] = uid
            at[aix[2]] = port
            out.append(enc((ar[1], at)))
            yield (row_id + 1, ar[0], ts, uid, ar[2], ar[3], port, ar[4], ar[5], ar[6], ar[7], ar[8],
                   ar[9], ar[10], ar[11], None, ar[12], ax)

    def _c_plan(self, proto: Record, companion: Record | None) -> tuple[Any, ...]:
        """The plan of ``storage/_copies.c`` (see there) for ``proto``, made from ``_plan``:
        its logical values' and ``x``'s msgpack cut around what changes per copy. None in
        the third place where the C code must leave the prototype to ``_encode_one``."""
        if len(self._cplans) >= COPY_PLANS_MAX:
            self._cplans.clear()
        plan = self._plan_for(proto, companion)
        cplan: tuple[Any, ...] = (proto, companion, None)
        if plan[1] is not None:
            r, t0, x0, ix = plan[1], plan[3], plan[4], plan[6]
            segs = _cut((r[1], t0), t0, ix[:5])
            # x is cut only where no trailing value can be trimmed: latency_us, an int, last.
            xsegs = _cut(x0, x0, ix[5:7]) if ix[6] == len(x0) - 1 else None
            comp = None
            if companion is not None:
                cp = plan[7]
                csegs = _cut((cp[1][1], cp[3]), cp[3], cp[6][:3])
                comp = None if csegs is None else (cp[1], csegs, cp[4])
            if segs is not None and xsegs is not None and (companion is None or comp is not None):
                cplan = (proto, companion, r, segs, xsegs, comp)
        self._cplans[id(proto)] = cplan
        return cplan

    def _plan_for(self, proto: Record, companion: Record | None) -> tuple[Any, ...]:
        """The plan kept for ``proto`` and ``companion``, made when there is none."""
        plan = self._plans.get(id(proto))
        if plan is None or plan[0] is not proto or plan[2] is not companion:
            plan = self._plan(proto, companion)
        return plan

    def _plan(self, proto: Record, companion: Record | None) -> tuple[Any, ...]:
        """How the copies of ``proto`` (and of its companion) are built: the prototype's
        row and logical values once, the places of the per-copy values. No plan (None in
        the second place) where a copy's row could differ elsewhere: a community id
        (derived from the client port), a field that is not where a Dns record has it."""
        if len(self._plans) >= COPY_PLANS_MAX:
            self._plans.clear()
        plan: tuple[Any, ...] = (proto, None, companion)
        try:
            main = self._part(proto, COPY_FIELDS)
            comp = self._part(companion, COMPANION_FIELDS) if companion is not None else None
        except (BadRecord, ValueError, KeyError, TypeError):
            main = comp = None
        if main is not None and (companion is None or comp is not None):
            plan = (proto, main[1], companion, main[3], main[4], main[5], main[6], comp)
        self._plans[id(proto)] = plan
        return plan

    def _part(self, rec: Record, varying: tuple[str, ...]) -> tuple[Any, ...] | None:
        lay = next((lay for lay in self.layouts.values() if lay.cls is type(rec)), None)
        if lay is None or rec.community_id is not None:
            return None
        row, _ = self.encode(rec, 0)
        # Everything of the row but id, ts, uid, client_port, community_id and x, in order.
        r = (row[1], lay.tag, row[4], row[5], row[7], row[8], row[9], row[10], row[11], row[12],
             row[13], row[14], row[16])
        t0 = list(msgspec.structs.astuple(rec))
        ix = [lay.fields.index(f) for f in varying]
        sd = lay.stored_defaults
        if varying is COPY_FIELDS:
            x0 = list(_dec.decode(row[17])) if row[17] is not None else []
            x0 += sd[len(x0):]
            ix += [lay.specific.index("dns_id"), lay.specific.index("latency_us")]
            return (rec, r, None, t0, x0, sd, ix)
        if any(f in lay.specific for f in varying):
            return None
        return (rec, r, None, t0, row[17], sd, ix)


COPY_FIELDS = ("ts", "uid", "client_port", "dns_id", "latency_us")
"""What differs between the copies of one prototype (the DNS shim's hit path)."""
COMPANION_FIELDS = ("ts", "uid", "client_port")
"""What differs between the copies of a prototype's companion (the alarm of a block)."""
COPY_PLANS_MAX = 65_536
"""Prototypes whose encoding a RowEncoder keeps (cleared when full)."""


def _cut(whole: Any, values: list[Any], at: Any) -> tuple[bytes, ...] | None:
    """The msgpack of ``whole`` (which ends with the array ``values``) cut around the
    values at the increasing indexes ``at``: len(at) + 1 pieces, the cut values left out."""
    at = list(at)
    if at != sorted(set(at)):
        return None
    parts = [_enc.encode(v) for v in values]
    full = _enc.encode(whole)
    head = full[:len(full) - sum(map(len, parts))]
    bounds = [-1, *at, len(parts)]
    pieces = [b"".join(parts[a + 1:b]) for a, b in zip(bounds, bounds[1:])]
    pieces[0] = head + pieces[0]
    return tuple(pieces)


@dataclass(slots=True, eq=False)
class Copies:
    """Records given as prototypes and per-copy values: the DNS hit path's records.

    Each entry is ``(proto, companion, ts, uid, client_port, dns_id, latency_us)``: the
    record ``proto`` with those five fields replaced, followed, when ``companion`` is not
    None, by ``companion`` with ``ts``, ``uid`` and ``client_port`` replaced. The writer
    queues a ``Copies`` as the ``count`` records it stands for and encodes it from each
    prototype's row (``RowEncoder.encode_copies``), the rows and chain bytes being exactly
    those of the expanded records.

    The hit path gives its entries packed (``packed``: a channel frame's hit records and
    the templates they name, storage/hits.py); ``entries`` makes them from there the
    first time something reads them."""

    listed: list[tuple[Any, Any, int, str, int, int, int]] | None
    """The entries, or None until made from ``packed``."""
    count: int
    lo: int
    """Least ``ts`` of the entries (the writer routes and spans batches by it)."""
    hi: int
    """Greatest ``ts`` of the entries."""
    packed: tuple[bytes, dict[int, Template]] | None = None
    """(hit records, their templates by number), for ``storage.hits`` and the C that
    reads them in place; None for entries given as a list."""

    @classmethod
    def of_hits(cls, records: bytes, templates: dict[int, Template]) -> Copies:
        """Copies of the hit records ``records`` (storage/hits.py), kept packed."""
        tmap, count, lo, hi = (_copies or hits).scan(records, templates)
        return cls(None, count, lo, hi, (records, tmap))

    @property
    def entries(self) -> list[tuple[Any, Any, int, str, int, int, int]]:
        if self.listed is None:
            assert self.packed is not None
            self.listed = (_copies or hits).expand(*self.packed)
        return self.listed

    def __eq__(self, other: object) -> bool:
        return type(other) is Copies and (self.count, self.lo, self.hi, self.entries) == (
            other.count, other.lo, other.hi, other.entries)

    @classmethod
    def of(cls, entries: list[tuple[Any, Any, int, str, int, int, int]]) -> Copies:
        tss = [e[2] for e in entries]
        return cls(entries, len(entries) + sum(1 for e in entries if e[1] is not None),
                   min(tss, default=0), max(tss, default=0))

    @staticmethod
    def expand_one(proto: Any, companion: Any, ts: int, uid: str, port: int, dns_id: int,
                   latency: int) -> list[Record]:
        rep = msgspec.structs.replace
        out = [rep(proto, ts=ts, uid=uid, client_port=port, dns_id=dns_id, latency_us=latency)]
        if companion is not None:
            out.append(rep(companion, ts=ts, uid=uid, client_port=port))
        return out

    def records(self) -> list[Record]:
        """The records these copies stand for, in order."""
        return [r for e in self.entries for r in self.expand_one(*e)]

    def split(self, day_of_ts: Callable[[int], str]) -> dict[str, Copies]:
        """Grouped by day (the rare batch that straddles midnight)."""
        groups: dict[str, list[Any]] = {}
        for e in self.entries:
            groups.setdefault(day_of_ts(e[2]), []).append(e)
        return {d: Copies.of(es) for d, es in groups.items()}


def latest_of(copies: Copies, into: dict[int, tuple[Any, ...]]) -> None:
    """``latest_copies`` of ``copies``' entries, without making them where they are packed
    (``into``'s values then hold the entries' first three fields: proto, companion, ts)."""
    if copies.packed is not None and copies.listed is None:
        (_copies.latest_hits if _copies is not None else hits.latest)(*copies.packed, into)
    else:
        latest_copies(copies.entries, into)


def latest_copies(entries: list[tuple[Any, ...]], into: dict[int, tuple[Any, ...]]) -> None:
    """Each of ``entries`` moved to the end of ``into`` under id(its prototype): ``into``
    then holds each prototype's latest copy, in the order of those latest copies (in C
    where ``storage._copies`` is built)."""
    if _copies is not None:
        _copies.latest(entries, into)
        return
    for e in entries:
        k = id(e[0])
        if k in into:
            del into[k]
        into[k] = e


def group_hits(copies: list[Copies]) -> tuple[list[tuple[bytes, dict[int, Template]]], list[tuple[Any, Any, bytes]]] | None:
    """``by_prototype`` for copies all kept packed, without making their entries: (the
    packs, [(proto, companion, the (pack, record) pairs of its copies), ...]); None
    where C is not built, a copy is not packed, or one prototype has two companions."""
    if _copies is None or any(c.packed is None for c in copies):
        return None
    packs = [c.packed for c in copies]
    got = _copies.group_hits(packs)
    return None if got is None else (packs, got)  # type: ignore[return-value]


def by_prototype(copies: list[Copies]) -> list[list[tuple[Any, ...]]]:
    """The entries of ``copies`` grouped by prototype and companion, groups in order of
    first appearance, entries in their order (the writer's runs, storage/runs.py); in C
    where ``storage._copies`` is built (the writer does it for every DNS hit)."""
    if _copies is not None:
        got = _copies.group([c.entries for c in copies])
        if got is not None:
            return got  # type: ignore[no-any-return]
    by: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
    for c in copies:
        for e in c.entries:
            k = (id(e[0]), id(e[1]))
            g = by.get(k)
            if g is None:
                g = by[k] = []
            g.append(e)
    return list(by.values())


# The column order above is written out for speed; this guards it against drift.
assert COLUMNS == (
    "id", "kind", "ts", "uid", "account", "client_ip", "client_port", "client_mac", "nat_ip",
    "nat_port", "server_ip", "server_port", "action", "rule_ids", "ruleset_version",
    "community_id", "domain", "x",
), "storage/schema.py: Record fields changed; update RowEncoder.encode and RowDecoder"


# --- decoding ----------------------------------------------------------------------------


class RowDecoder:
    """Row of ``rec`` -> logical values and Record, using the file's own layouts."""

    def __init__(self, conn: sqlite3.Connection, *, preload: bool = False) -> None:
        self.conn = conn
        self.layouts = load_layouts(conn)
        self.strs: dict[int, str | list[str]] = {}
        if preload:
            self.strs = {i: unintern(v) for i, v in conn.execute("SELECT id, v FROM strs")}

    def s(self, i: int | None) -> Any:
        if i is None:
            return None
        v = self.strs.get(i)
        if v is None:
            row = self.conn.execute("SELECT v FROM strs WHERE id = ?", (i,)).fetchone()
            if row is None:
                raise ValueError(f"string id {i} missing from strs")
            v = self.strs[i] = unintern(row[0])
        return v

    def values(self, row: tuple[Any, ...]) -> tuple[Layout, dict[str, Any]]:
        (_id, code, ts, uid, acct, cip, cport, mac, nip, nport, sip, sport, action, rules, rsv, cid, dom, x) = row
        lay = self.layouts[code]
        v: dict[str, Any] = {
            "ts": ts,
            "uid": uid,
            "account": self.s(acct),
            "client_ip": ip_from_db(cip),
            "client_port": cport,
            "client_mac": self.s(mac),
            "nat_ip": ip_from_db(nip),
            "nat_port": nport,
            "server_ip": ip_from_db(sip),
            "server_port": sport,
            "action": ACTIONS[action] if isinstance(action, int) else action,
            "rule_ids": [] if rules is None else list(self.s(rules)),
            "ruleset_version": rsv,
        }
        if lay.domain_field:
            v[lay.domain_field] = self.s(dom)
        xs = _dec.decode(x) if x is not None else []
        for k, name in enumerate(lay.specific):
            val = xs[k] if k < len(xs) else lay.stored_defaults[k]
            if name in INTERNED:
                if val is None:
                    d = lay.defaults[name]
                    val = [] if isinstance(d, list) else d
                else:
                    val = self.s(val)
                    val = list(val) if isinstance(val, list) else val
            elif name in DELTA_FIELDS and val is not None:
                val = val + ts
            elif isinstance(val, list):
                val = list(val)
            v[name] = val
        if cid == CID_DERIVED and type(cid) is int:
            proto = v.get("proto") if lay.tag == "conn" else v.get("transport") if lay.tag == "dns" else "tcp"
            cid = community_id(proto, v["client_ip"], cport, v["server_ip"], sport)
        v["community_id"] = cid
        return lay, v

    def logical(self, row: tuple[Any, ...]) -> bytes:
        """The bytes the writer hashed for this row."""
        return self.logical_of(*self.values(row))

    @staticmethod
    def logical_of(lay: Layout, v: dict[str, Any]) -> bytes:
        """The logical bytes of ``values``' result."""
        return _enc.encode((lay.tag, tuple(v[f] for f in lay.fields)))

    def record(self, row: tuple[Any, ...]) -> Record:
        return self.build(*self.values(row))

    @staticmethod
    def build(lay: Layout, v: dict[str, Any]) -> Record:
        """The record of ``values``' result (a run's copy is such a result, changed)."""
        cls = lay.cls
        if cls is None:
            raise ValueError(f"unknown record kind {lay.tag!r}")
        known = cls.__struct_fields__
        return cls(**{k: val for k, val in v.items() if k in known})
