"""The coordinator ledger (sqlite3, WAL): registered sites, uploads, accepted shards (exactly once) and events."""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from privdistill.errors import ConfigError
from privdistill.identity import parse_public_key
from privdistill.shard import ID_PATTERN

from coordinator.store import shard_dir

TOUCH_INTERVAL_S = 30.0

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites(
    name TEXT PRIMARY KEY, public_key TEXT NOT NULL, added_at TEXT NOT NULL,
    revoked_at TEXT, last_seen_at TEXT);
CREATE TABLE IF NOT EXISTS uploads(
    id TEXT PRIMARY KEY, site TEXT NOT NULL REFERENCES sites(name), tar_sha256 TEXT NOT NULL,
    size INTEGER NOT NULL CHECK (size > 0),
    "offset" INTEGER NOT NULL DEFAULT 0 CHECK ("offset" >= 0 AND "offset" <= size),
    state TEXT NOT NULL CHECK (state IN ('receiving', 'accepted', 'rejected')), reason TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, manifest TEXT NOT NULL, signature TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS uploads_one_open ON uploads(site, tar_sha256) WHERE state = 'receiving';
CREATE TABLE IF NOT EXISTS shards(
    tar_sha256 TEXT PRIMARY KEY, site TEXT NOT NULL REFERENCES sites(name), shard_id TEXT NOT NULL,
    upload_id TEXT NOT NULL UNIQUE REFERENCES uploads(id), sample_count INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL, accepted_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, kind TEXT NOT NULL, site TEXT,
    shard_sha256 TEXT, reason TEXT);
"""
_UPLOAD_COLS = 'id, site, tar_sha256, size, "offset", state, reason, created_at, updated_at, manifest, signature'


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class SiteRow:
    name: str
    public_key: str
    added_at: str
    revoked_at: str | None
    last_seen_at: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class UploadRow:
    id: str
    site: str
    tar_sha256: str
    size: int
    offset: int
    state: str
    reason: str | None
    created_at: str
    updated_at: str
    manifest: str
    signature: str


@dataclass(frozen=True)
class AcceptedShard:
    tar_sha256: str
    site: str
    shard_id: str
    sample_count: int
    accepted_at: str
    dir: Path
    upload_id: str = ""
    manifest_sha256: str = ""


@dataclass(frozen=True)
class Event:
    id: int
    time: str
    kind: str
    site: str | None
    shard_sha256: str | None
    reason: str | None


class Ledger:
    """One short sqlite connection per call (safe from any thread); writes use BEGIN IMMEDIATE transactions."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.state_dir = self.path.parent
        self._touched: dict[str, float] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        finally:
            db.close()

    # ------------------------------------------------------------------ plumbing
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL: a commit survives a killed process; after a power cut the last commits may roll
        # back, which leaves an offset behind the bytes on disk (truncated at start) or an accepted
        # upload back at "receiving" with every byte present (re-verified and accepted at start).
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        db = self._connect()
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    @staticmethod
    def _event(db: sqlite3.Connection, kind: str, site: str | None, sha: str | None, reason: str | None) -> None:
        db.execute("INSERT INTO events(time, kind, site, shard_sha256, reason) VALUES (?, ?, ?, ?, ?)",
                   (utcnow(), kind, site, sha, reason))

    # ------------------------------------------------------------------ sites
    def add_site(self, name: str, public_key_b64: str) -> SiteRow:
        problems = []
        if not re.fullmatch(ID_PATTERN, name):
            problems.append(f"site name {name!r} must match {ID_PATTERN} (lower-case letters, digits, _ and -)")
        try:
            parse_public_key(public_key_b64)
        except ConfigError as err:
            problems += err.problems
        if problems:
            raise ConfigError(problems)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM sites WHERE name = ?", (name,)).fetchone():
                raise ConfigError([f"site {name!r} is already registered (revoked sites keep their name; "
                                   "choose another name)"])
            db.execute("INSERT INTO sites(name, public_key, added_at) VALUES (?, ?, ?)",
                       (name, public_key_b64.strip(), utcnow()))
            self._event(db, "site_added", name, None, None)
        site = self.site(name)
        assert site is not None
        return site

    def revoke_site(self, name: str) -> SiteRow:
        with self._tx() as db:
            row = db.execute("SELECT revoked_at FROM sites WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ConfigError([f"site {name!r} is not registered (see `sites list`)"])
            if row[0] is None:
                db.execute("UPDATE sites SET revoked_at = ? WHERE name = ?", (utcnow(), name))
                self._event(db, "site_revoked", name, None, None)
        site = self.site(name)
        assert site is not None
        return site

    def rotate_site_key(self, name: str, public_key_b64: str, *, reason: str | None = None) -> SiteRow:
        """Replace a registered site's public key (its name, shards and events stay); a revoked site is active again."""
        parse_public_key(public_key_b64)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM sites WHERE name = ?", (name,)).fetchone() is None:
                raise ConfigError([f"site {name!r} is not registered (see `sites list`)"])
            db.execute("UPDATE sites SET public_key = ?, revoked_at = NULL WHERE name = ?",
                       (public_key_b64.strip(), name))
            self._event(db, "site_key_rotated", name, None, reason)
        site = self.site(name)
        assert site is not None
        return site

    def site(self, name: str) -> SiteRow | None:
        rows = self._query("SELECT name, public_key, added_at, revoked_at, last_seen_at FROM sites WHERE name = ?",
                           (name,))
        return SiteRow(*rows[0]) if rows else None

    def sites(self) -> list[SiteRow]:
        return [SiteRow(*r) for r in self._query(
            "SELECT name, public_key, added_at, revoked_at, last_seen_at FROM sites ORDER BY name")]

    def touch_site(self, name: str, *, min_interval_s: float = TOUCH_INTERVAL_S) -> None:
        """Record a site's last contact (at most once per ``min_interval_s``: it is not worth a write per chunk)."""
        now = time.monotonic()
        if now - self._touched.get(name, -math.inf) < min_interval_s:
            return
        with self._tx() as db:
            db.execute("UPDATE sites SET last_seen_at = ? WHERE name = ?", (utcnow(), name))
        self._touched[name] = now

    # ------------------------------------------------------------------ uploads
    def create_upload(self, upload_id: str, site: str, tar_sha256: str, size: int, manifest: str,
                      signature: str) -> tuple[UploadRow, bool]:
        """Insert a receiving upload, or return the open one for (site, tar_sha256); ``True`` when created."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_UPLOAD_COLS} FROM uploads WHERE site = ? AND tar_sha256 = ? "
                             "AND state = 'receiving'", (site, tar_sha256)).fetchone()
            if row is not None:
                return UploadRow(*row), False
            now = utcnow()
            db.execute(f"INSERT INTO uploads({_UPLOAD_COLS}) VALUES (?, ?, ?, ?, 0, 'receiving', NULL, ?, ?, ?, ?)",
                       (upload_id, site, tar_sha256, size, now, now, manifest, signature))
            self._event(db, "upload_created", site, tar_sha256, None)
        created = self.upload(upload_id)
        assert created is not None
        return created, True

    def upload(self, upload_id: str) -> UploadRow | None:
        rows = self._query(f"SELECT {_UPLOAD_COLS} FROM uploads WHERE id = ?", (upload_id,))
        return UploadRow(*rows[0]) if rows else None

    def uploads(self, state: str | None = None) -> list[UploadRow]:
        """Every upload (or those in ``state``), oldest first."""
        sql = f"SELECT {_UPLOAD_COLS} FROM uploads"
        rows = self._query(sql + " WHERE state = ? ORDER BY created_at", (state,)) if state else \
            self._query(sql + " ORDER BY created_at")
        return [UploadRow(*r) for r in rows]

    def open_uploads(self) -> list[UploadRow]:
        return [UploadRow(*r) for r in self._query(
            f"SELECT {_UPLOAD_COLS} FROM uploads WHERE state = 'receiving' ORDER BY created_at")]

    def set_offset(self, upload_id: str, old: int, new: int) -> bool:
        """Move a receiving upload's offset from ``old`` to ``new``; False if it was not at ``old``."""
        with self._tx() as db:
            cur = db.execute('UPDATE uploads SET "offset" = ?, updated_at = ? '
                             "WHERE id = ? AND \"offset\" = ? AND state = 'receiving'", (new, utcnow(), upload_id, old))
            return cur.rowcount == 1

    def reject(self, upload_id: str, reason: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT site, tar_sha256 FROM uploads WHERE id = ? AND state = 'receiving'",
                             (upload_id,)).fetchone()
            if row is None:
                return
            db.execute("UPDATE uploads SET state = 'rejected', reason = ?, updated_at = ? WHERE id = ?",
                       (reason, utcnow(), upload_id))
            self._event(db, "rejected", row[0], row[1], reason)

    def accept(self, upload_id: str, *, shard_id: str, sample_count: int, manifest_sha256: str) -> bool:
        """Record the upload's shard as accepted, exactly once per tar_sha256 (one transaction).

        Returns True if this call added the shard, False if that tar_sha256 was already accepted
        (the upload is then closed as accepted too, pointing at the existing shard)."""
        with self._tx() as db:
            row = db.execute("SELECT site, tar_sha256, state FROM uploads WHERE id = ?", (upload_id,)).fetchone()
            if row is None or row[2] != "receiving":
                return False
            site, sha, _ = row
            now = utcnow()
            exists = db.execute("SELECT 1 FROM shards WHERE tar_sha256 = ?", (sha,)).fetchone() is not None
            if not exists:
                db.execute("INSERT INTO shards(tar_sha256, site, shard_id, upload_id, sample_count, manifest_sha256, "
                           "accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (sha, site, shard_id, upload_id, sample_count, manifest_sha256, now))
            db.execute("UPDATE uploads SET state = 'accepted', reason = ?, \"offset\" = size, updated_at = ? "
                       "WHERE id = ?", (None if not exists else "duplicate", now, upload_id))
            self._event(db, "accepted", site, sha, None if not exists else "duplicate")
            return not exists

    # ------------------------------------------------------------------ shards and events
    def _shard(self, r: tuple) -> AcceptedShard:
        sha, site, shard_id, upload_id, count, msha, at = r
        return AcceptedShard(tar_sha256=sha, site=site, shard_id=shard_id, sample_count=count, accepted_at=at,
                             dir=shard_dir(self.state_dir, sha), upload_id=upload_id, manifest_sha256=msha)

    def accepted_shards(self) -> list[AcceptedShard]:
        return [self._shard(r) for r in self._query(
            "SELECT tar_sha256, site, shard_id, upload_id, sample_count, manifest_sha256, accepted_at FROM shards "
            "ORDER BY accepted_at, tar_sha256")]

    def shard(self, tar_sha256: str) -> AcceptedShard | None:
        rows = self._query("SELECT tar_sha256, site, shard_id, upload_id, sample_count, manifest_sha256, accepted_at "
                           "FROM shards WHERE tar_sha256 = ?", (tar_sha256,))
        return self._shard(rows[0]) if rows else None

    def record_event(self, kind: str, *, site: str | None = None, shard_sha256: str | None = None,
                     reason: str | None = None) -> None:
        with self._tx() as db:
            self._event(db, kind, site, shard_sha256, reason)

    def events(self, kind: str | None = None) -> list[Event]:
        sql = "SELECT id, time, kind, site, shard_sha256, reason FROM events"
        rows = self._query(sql + " WHERE kind = ? ORDER BY id", (kind,)) if kind else self._query(sql + " ORDER BY id")
        return [Event(*r) for r in rows]
