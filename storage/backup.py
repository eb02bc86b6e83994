"""``linewarden backup run|verify|restore``: closed days copied elsewhere with a manifest.

* ``run``: every closed day (its final head signed in the digest log) that the backup does
  not already hold at that head is copied with SQLite's online backup API (a consistent
  copy even while the writer runs), then hashed; ``MANIFEST.json`` records each file's
  SHA-256, size and chain head, and ``SHA256SUMS`` the same for ``sha256sum -c``. The
  digest log and the public key go along, so ``linewarden verify`` works on the copy.
* ``verify``: every file listed is present and hashes to its manifest entry; ``--deep``
  also re-checks the chains against the copied digest log.
* ``restore``: copies days back into a store after checking their hashes; it never
  overwrites a day file that differs unless told to (the old one is kept aside).

Must not modify the store during ``run`` or the backup during ``verify``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from storage.chain import DIGEST_LOG, read_digests
from storage.partitions import STORE_META, day_path, list_days, open_readonly

MANIFEST = "MANIFEST.json"
SUMS = "SHA256SUMS"
CHUNK = 1 << 20


@dataclass(slots=True)
class BackupReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load_manifest(backup_dir: Path) -> dict:
    try:
        return json.loads((backup_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return {"version": 1, "files": {}}


def _save_manifest(backup_dir: Path, m: dict) -> None:
    m["updated"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    tmp = backup_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=1, sort_keys=True))
    os.replace(tmp, backup_dir / MANIFEST)
    sums = "".join(f"{v['sha256']}  {k}\n" for k, v in sorted(m["files"].items()))
    (backup_dir / SUMS).write_text(sums)


def _closed_heads(store_dir: Path) -> dict[str, tuple[int, str]]:
    """day -> (batch, head) of days whose latest digest entry is a final close."""
    latest: dict[str, tuple[str, int, str]] = {}
    for _, e, _ in read_digests(store_dir / DIGEST_LOG, None):
        if e is not None:
            latest[e.day] = (e.event, e.batch, e.head)
    return {d: (b, h) for d, (ev, b, h) in latest.items() if ev == "close"}


def _file_head(path: Path) -> tuple[int, str] | None:
    try:
        conn = open_readonly(path)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT n, hash FROM batches ORDER BY n DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return (row[0], bytes(row[1]).hex()) if row else (-1, "")


def _copy_sqlite(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    s = open_readonly(src)
    d = sqlite3.connect(tmp)
    try:
        s.backup(d)
        d.execute("PRAGMA journal_mode=DELETE")  # the copy is one self-contained file
    finally:
        d.close()
        s.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def backup_run(store_dir: str | os.PathLike[str], backup_dir: str | os.PathLike[str]) -> BackupReport:
    store, dest = Path(store_dir), Path(backup_dir)
    dest.mkdir(parents=True, exist_ok=True)
    rep = BackupReport()
    m = _load_manifest(dest)
    m["store"] = str(store.resolve())
    closed = _closed_heads(store)
    for day in list_days(store):
        name = day_path(store, day).name
        if day not in closed:
            continue  # open days are backed up once closed and signed
        batch, head = closed[day]
        have = m["files"].get(name)
        if have and have.get("head") == head and have.get("batch") == batch and (dest / name).exists():
            rep.skipped.append(day)
            continue
        if _file_head(day_path(store, day)) != (batch, head):
            rep.problems.append(f"{day}: day file does not end at its signed head; not backed up (run `linewarden verify`)")
            continue
        _copy_sqlite(day_path(store, day), dest / name)
        m["files"][name] = {"day": day, "sha256": sha256_file(dest / name), "size": (dest / name).stat().st_size,
                            "batch": batch, "head": head}
        rep.copied.append(day)
    for extra in (DIGEST_LOG, STORE_META):
        if (store / extra).exists():
            shutil.copy2(store / extra, dest / extra)
            m["files"][extra] = {"sha256": sha256_file(dest / extra), "size": (dest / extra).stat().st_size}
    pub = store / "keys" / "signing.pub"
    if pub.exists():
        (dest / "keys").mkdir(exist_ok=True)
        shutil.copy2(pub, dest / "keys" / "signing.pub")
        m["files"]["keys/signing.pub"] = {"sha256": sha256_file(pub), "size": pub.stat().st_size}
    _save_manifest(dest, m)
    return rep


def backup_verify(backup_dir: str | os.PathLike[str], *, deep: bool = False) -> BackupReport:
    dest = Path(backup_dir)
    rep = BackupReport()
    if not (dest / MANIFEST).exists():
        rep.problems.append(f"{dest}: no {MANIFEST} (not a linewarden backup)")
        return rep
    m = _load_manifest(dest)
    for name, entry in sorted(m["files"].items()):
        p = dest / name
        if not p.exists():
            rep.problems.append(f"{name}: missing from the backup")
        elif sha256_file(p) != entry["sha256"]:
            rep.problems.append(f"{name}: SHA-256 does not match the manifest (changed or damaged)")
        else:
            rep.skipped.append(name)
    for day in list_days(dest):
        if day_path(dest, day).name not in m["files"]:
            rep.problems.append(f"{day_path(dest, day).name}: in the backup but not in the manifest")
    if deep:
        from storage.verify import verify_store

        days = [e["day"] for e in m["files"].values() if "day" in e]
        report = verify_store(dest, days=days, close_grace_s=0)
        rep.problems.extend(f"chain: {p}" for p in report.problems)
    return rep


def backup_restore(backup_dir: str | os.PathLike[str], store_dir: str | os.PathLike[str], *, days: list[str] | None = None, force: bool = False) -> BackupReport:
    """Copy days (default: all in the backup) back into ``store_dir``. A day already there
    with the same chain head is skipped; one that differs is refused unless ``force``, and
    then kept aside as ``<day>.sqlite.replaced-<time>``."""
    src, store = Path(backup_dir), Path(store_dir)
    rep = BackupReport()
    m = _load_manifest(src)
    entries = {e["day"]: (name, e) for name, e in m["files"].items() if "day" in e}
    wanted = days or sorted(entries)
    store.mkdir(parents=True, exist_ok=True)
    for extra in (STORE_META, DIGEST_LOG):
        if not (store / extra).exists() and (src / extra).exists():
            shutil.copy2(src / extra, store / extra)
    for day in wanted:
        if day not in entries:
            rep.problems.append(f"{day}: not in the backup")
            continue
        name, e = entries[day]
        if sha256_file(src / name) != e["sha256"]:
            rep.problems.append(f"{day}: backup copy does not match its manifest; not restored")
            continue
        target = store / name
        if target.exists():
            if _file_head(target) == (e["batch"], e["head"]):
                rep.skipped.append(day)
                continue
            if not force:
                rep.problems.append(f"{day}: the store has a different {name}; not overwritten (use --force)")
                continue
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            os.replace(target, target.with_name(f"{name}.replaced-{stamp}"))
            for suffix in ("-wal", "-shm"):
                Path(f"{target}{suffix}").unlink(missing_ok=True)
        tmp = target.with_name(name + ".tmp")
        shutil.copy2(src / name, tmp)
        os.replace(tmp, target)
        rep.copied.append(day)
    return rep
