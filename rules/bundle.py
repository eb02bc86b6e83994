"""Signed rule bundles: one file carrying a rule set from its maintainer to many gateways.

Owns: the bundle format, packing (with the maintainer's Ed25519 key), safe unpacking
and the acceptance checks. Must not: be called on the data path (it reads and writes
files), or decide where an accepted bundle is installed (linewarden/reload.py does).

Format: a gzip-compressed POSIX tar holding exactly::

    manifest.json   {"format": "linewarden-rules", "format_version": 1, "name", "version",
                     "created" (RFC 3339 UTC), "files": {"ruleset.toml": SHA256HEX, ...}}
    manifest.sig    {"key": "ed25519:<fingerprint>", "signature": BASE64}
    rules/<file>    the rule-set files (ruleset.toml and the rule files of rules/ruleset.py)

The signature is Ed25519 over the exact bytes of manifest.json, and manifest.json
names the SHA-256 of every file, so one signature covers the whole rule set.

Acceptance (``verify_bundle``), every check must pass and every failure is reported:
1. it unpacks safely: only the members above (regular files, no links, no directories,
   no ``..`` or absolute names: nothing is ever extracted by name, each member is read
   and written by us under a fixed name), within ``MAX_BUNDLE_BYTES``, ``MAX_FILE_BYTES``
   and ``MAX_UNPACKED_BYTES``;
2. the signature verifies against one of the trusted public keys;
3. every file's SHA-256 matches the manifest, and no file is missing or extra;
4. the rule set validates (rules/ruleset.py) and its name and version are the manifest's;
5. its version is higher than the running one, unless ``allow_downgrade`` (an explicit
   admin act, recorded by the caller).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rules.errors import LinewardenError, RuleSetError
from rules.ruleset import RULE_FILES, RuleSet, load_ruleset

FORMAT = "linewarden-rules"
FORMAT_VERSION = 1
BUNDLE_FILES = ("ruleset.toml", *RULE_FILES)
"""The files a bundle may carry (under ``rules/``)."""

MAX_BUNDLE_BYTES = 1 << 30
"""Largest bundle file accepted (1 GiB): a 1M-domain + 100k-keyword bundle is ~15 MB."""
MAX_FILE_BYTES = 512 * 1024 * 1024
"""Largest unpacked member: rules/ruleset.py's own ``MAX_FILE_BYTES``."""
MAX_UNPACKED_BYTES = 2 << 30
"""All members together, unpacked (2 GiB): bounds a decompression bomb."""
MAX_MANIFEST_BYTES = 64 * 1024
"""manifest.json and manifest.sig are small; a large one is not ours."""
MAX_MEMBERS = len(BUNDLE_FILES) + 2


class BundleError(LinewardenError):
    """A bundle was refused; ``reasons`` says every why."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons))


@dataclass(frozen=True, slots=True)
class Bundle:
    """An accepted bundle, unpacked in ``dir``."""

    name: str
    version: int
    created: str
    key: str
    """Fingerprint of the key that signed it."""
    dir: Path
    manifest_sha256: str
    ruleset: RuleSet | None = None
    """The validated rule set (so the caller compiles it without reading it again)."""


def pack(rules_dir: Path, out: Path, key: Any, *, now: datetime) -> dict[str, Any]:
    """Write the bundle of ``rules_dir`` to ``out``, signed with ``key`` (linewarden.keys.KeyPair).

    The rule set must validate first: a maintainer never ships a bundle every gateway
    would refuse. Returns the manifest.
    """
    try:
        rs = load_ruleset(rules_dir)
    except RuleSetError as e:
        raise BundleError([f"rule set does not validate: {p}" for p in e.problems[:20]]) from None
    files = [f for f in BUNDLE_FILES if (rules_dir / f).is_file()]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": rs.name,
        "version": rs.version,
        "created": now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": {f: _sha256_file(rules_dir / f) for f in files},
    }
    body = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    sig = json.dumps({"key": key.fingerprint, "signature": key.sign(body)}).encode() + b"\n"
    tmp = out.with_name(f".{out.name}.tmp")
    mtime = int(now.timestamp())
    # Level 6: on the 100k-keyword + 1M-domain set of bench_reload.py, 2.5 s against
    # level 9's 7.7 s for a bundle 0.03 % larger.
    with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT, compresslevel=6) as tar:
        _add(tar, "manifest.json", body, mtime)
        _add(tar, "manifest.sig", sig, mtime)
        for f in files:
            _add(tar, f"rules/{f}", (rules_dir / f).read_bytes(), mtime)
    os.replace(tmp, out)
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unpack(bundle: Path, dest: Path) -> tuple[bytes, bytes]:
    """Unpack safely into ``dest`` (created; must not exist): (manifest.json, manifest.sig)."""
    size = bundle.stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise BundleError([f"bundle is {size} bytes; at most {MAX_BUNDLE_BYTES} are accepted"])
    dest.mkdir(parents=True)
    (dest / "rules").mkdir()
    manifest = sig = None
    total = 0
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            for n, member in enumerate(tar):
                if n >= MAX_MEMBERS:
                    raise BundleError([f"more than {MAX_MEMBERS} members"])
                name = member.name
                if not member.isreg():
                    raise BundleError([f"member {name[:80]!r} is not a regular file (links and "
                                       f"directories are refused)"])
                if name in ("manifest.json", "manifest.sig"):
                    limit = MAX_MANIFEST_BYTES
                elif name.startswith("rules/") and name[6:] in BUNDLE_FILES:
                    limit = MAX_FILE_BYTES
                else:
                    raise BundleError([f"unexpected member {name[:80]!r} (allowed: manifest.json, "
                                       f"manifest.sig, rules/{{{','.join(BUNDLE_FILES)}}})"])
                if member.size > limit:
                    raise BundleError([f"member {name} is {member.size} bytes; at most {limit}"])
                total += member.size
                if total > MAX_UNPACKED_BYTES:
                    raise BundleError([f"unpacked size beyond {MAX_UNPACKED_BYTES} bytes"])
                src = tar.extractfile(member)
                assert src is not None
                if limit == MAX_MANIFEST_BYTES:
                    data = src.read(limit + 1)
                    if name == "manifest.json":
                        manifest = data
                    else:
                        sig = data
                    continue
                target = dest / "rules" / name[6:]  # a fixed name from BUNDLE_FILES
                if target.exists():
                    raise BundleError([f"member {name} appears twice"])
                with open(target, "xb") as out:
                    copied = 0
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        copied += len(chunk)
                        if copied > limit:
                            raise BundleError([f"member {name} is larger than it claims"])
                        out.write(chunk)
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, FileExistsError):
            raise BundleError([f"a member appears twice: {e}"]) from None
        raise BundleError([f"not a readable bundle (gzip tar): {e}"]) from None
    if manifest is None or sig is None:
        raise BundleError(["manifest.json or manifest.sig missing: not a signed bundle"])
    return manifest, sig


def verify_bundle(
    bundle: Path, pubkeys: Sequence[Any], dest: Path, *,
    running_version: int | None = None, allow_downgrade: bool = False,
) -> Bundle:
    """Unpack ``bundle`` into ``dest`` and run every acceptance check (module docstring)."""
    from linewarden import keys

    manifest_bytes, sig_bytes = unpack(bundle, dest)
    try:
        sig = json.loads(sig_bytes)
        sig_b64 = sig["signature"]
        assert isinstance(sig_b64, str)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise BundleError(["manifest.sig is not {\"key\": ..., \"signature\": BASE64}"]) from None
    signer = next((k for k in pubkeys if keys.verify(k, sig_b64, manifest_bytes)), None)
    if signer is None:
        names = ", ".join(keys.fingerprint(k) for k in pubkeys) or "none configured"
        raise BundleError([f"bad signature: manifest not signed by a trusted key (signed by "
                           f"{str(sig.get('key'))[:40]}; trusted: {names})"])
    try:
        manifest = json.loads(manifest_bytes)
        files: dict[str, str] = manifest["files"]
        name, version, created = manifest["name"], manifest["version"], manifest["created"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(["manifest.json lacks name, version, created or files"]) from None
    reasons: list[str] = []
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        reasons.append(f"format {manifest.get('format')!r} v{manifest.get('format_version')!r}; "
                       f"this appliance reads {FORMAT} v{FORMAT_VERSION}")
    present = {p.name for p in (dest / "rules").iterdir()}
    for f in sorted(set(files) - present):
        reasons.append(f"{f}: listed in the manifest but missing")
    for f in sorted(present - set(files)):
        reasons.append(f"{f}: in the bundle but not in the manifest")
    for f in sorted(set(files) & present):
        if _sha256_file(dest / "rules" / f) != files[f]:
            reasons.append(f"{f}: SHA-256 does not match the manifest (altered after signing)")
    if reasons:
        raise BundleError(reasons)
    try:
        rs = load_ruleset(dest / "rules")
    except RuleSetError as e:
        raise BundleError([f"invalid rule set: {p}" for p in e.problems[:50]]) from None
    if (rs.name, rs.version) != (name, version):
        raise BundleError([f"ruleset.toml says {rs.name} v{rs.version}, the manifest {name} v{version}"])
    if running_version is not None and version <= running_version and not allow_downgrade:
        raise BundleError([f"version {version} is not higher than the running version "
                           f"{running_version} (an older or equal rule set needs --allow-downgrade)"])
    return Bundle(name, version, created, keys.fingerprint(signer), dest,
                  hashlib.sha256(manifest_bytes).hexdigest(), rs)
