"""The coordinator ledger (sqlite3, WAL): registered sites, uploads, accepted shards (exactly once) and events."""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from coordinator.store import shard_dir
from privdistill.errors import ConfigError
from privdistill.identity import parse_public_key
from privdistill.shard import ID_PATTERN
from privdistill.sqlite import ThreadConnections, connect, kept_or_new, require_existing, transaction

TOUCH_INTERVAL_S = 30.0

SCHEMA_VERSION = 2
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
    manifest_sha256 TEXT NOT NULL, accepted_at TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'active', status_reason TEXT);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, kind TEXT NOT NULL, site TEXT,
    shard_sha256 TEXT, reason TEXT);
"""
_UPLOAD_COLS = 'id, site, tar_sha256, size, "offset", state, reason, created_at, updated_at, manifest, signature'
_SHARD_COLS = "tar_sha256, site, shard_id, upload_id, sample_count, manifest_sha256, accepted_at, status, status_reason"
# a shard's status: only "active" shards are visible to training. "excluded": its site was revoked; "quarantined":
# held back by the operator; both return with `shards include`. "removed": its files are deleted (final).
SHARD_STATUSES = ("active", "excluded", "quarantined", "removed")


class QuotaExceeded(Exception):
    """A site's open uploads would exceed a quota; ``reason`` names which."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
    status: str = "active"
    status_reason: str | None = None


@dataclass(frozen=True)
class Event:
    id: int
    time: str
    kind: str
    site: str | None
    shard_sha256: str | None
    reason: str | None


class Ledger:
    """One short sqlite connection per call, or with ``keep_open`` one kept per thread (safe from any thread);
    writes use BEGIN IMMEDIATE transactions."""

    def __init__(self, path: Path, *, keep_open: bool = False, read_only: bool = False) -> None:
        """Open (or create) the ledger at ``path``.

        ``read_only``: open an existing one for reading only (list commands), ConfigError when there is none, so a
        mistyped state_dir creates nothing. ``keep_open``: hold one idle connection for this object's life (the
        server does), so that closing each call's connection is never the last close of the database, which in WAL
        mode checkpoints and deletes the WAL file (fsyncs on every call). ``close`` releases it; close it before
        forking worker processes."""
        self.path = Path(path)
        self.state_dir = self.path.parent
        self._touched: dict[str, float] = {}
        self._keepalive: sqlite3.Connection | None = None
        self._threads: ThreadConnections | None = None  # keep_open: one connection per thread, kept
        self.read_only = read_only
        if read_only:
            require_existing(self.path, "ledger", "check state_dir in the coordinator config (it is created by "
                             "`provision` and `serve`)")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            found = int(db.execute("PRAGMA user_version").fetchone()[0])
            if found > SCHEMA_VERSION:  # a newer version's tables: migrating "down" could lose what it records
                raise ConfigError([f"the ledger {self.path} has schema version {found}, newer than the {SCHEMA_VERSION} "
                                   "this privdistill reads; run the privdistill version that wrote it (or newer)"])
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            cols = {r[1] for r in db.execute("PRAGMA table_info(shards)")}
            if "status" not in cols:  # a version-1 ledger: every shard it holds was active
                db.execute("ALTER TABLE shards ADD COLUMN status TEXT NOT NULL DEFAULT 'active'")
                db.execute("ALTER TABLE shards ADD COLUMN status_reason TEXT")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        finally:
            db.close()
        if keep_open:
            self._keepalive = self._connect()
            self._threads = ThreadConnections(lambda: connect(self.path, foreign_keys=True, check_same_thread=False))

    def close(self) -> None:
        """Release the connections ``keep_open`` holds (a later call opens its own again)."""
        if self._keepalive is not None:
            self._keepalive.close()
            self._keepalive = None
        if self._threads is not None:
            self._threads.close()

    # ------------------------------------------------------------------ plumbing
    def _connect(self) -> sqlite3.Connection:
        # WAL + NORMAL: a commit survives a killed process; after a power cut the last commits may roll
        # back, which leaves an offset behind the bytes on disk (truncated at start) or an accepted
        # upload back at "receiving" with every byte present (re-verified and accepted at start).
        return connect(self.path, foreign_keys=True, read_only=self.read_only)

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        """This thread's kept connection (``keep_open``), else a new one closed after the call."""
        return kept_or_new(self._threads, self._connect)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._db() as db, transaction(db):
            yield db

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db() as db:
            return db.execute(sql, args).fetchall()

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

    def revoke_site(self, name: str) -> tuple[SiteRow, int, int]:
        """Refuse the site's key from now on, close its open uploads and exclude its active shards from training
        (until `shards include`). Returns (site, shards excluded, uploads closed)."""
        excluded = closed = 0
        with self._tx() as db:
            row = db.execute("SELECT revoked_at FROM sites WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ConfigError([f"site {name!r} is not registered (see `sites list`)"])
            if row[0] is None:
                db.execute("UPDATE sites SET revoked_at = ? WHERE name = ?", (utcnow(), name))
                self._event(db, "site_revoked", name, None, None)
            for (sha,) in db.execute("SELECT tar_sha256 FROM shards WHERE site = ? AND status = 'active'",
                                     (name,)).fetchall():
                db.execute("UPDATE shards SET status = 'excluded', status_reason = 'site_revoked' WHERE tar_sha256 = ?",
                           (sha,))
                self._event(db, "shard_excluded", name, sha, "site_revoked")
                excluded += 1
            closed = db.execute("UPDATE uploads SET state = 'rejected', reason = 'site_revoked', updated_at = ? "
                                "WHERE site = ? AND state = 'receiving'", (utcnow(), name)).rowcount
        site = self.site(name)
        assert site is not None
        return site, excluded, closed

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
                      signature: str, *, max_open: int | None = None,
                      max_open_bytes: int | None = None) -> tuple[UploadRow, bool]:
        """Insert a receiving upload, or return the open one for (site, tar_sha256); ``True`` when created.
        Raises QuotaExceeded when the site's open uploads would number more than ``max_open`` or declare more than
        ``max_open_bytes`` in all (checked in the same transaction as the insert)."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_UPLOAD_COLS} FROM uploads WHERE site = ? AND tar_sha256 = ? "
                             "AND state = 'receiving'", (site, tar_sha256)).fetchone()
            if row is not None:
                return UploadRow(*row), False
            n, declared = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM uploads WHERE site = ? AND "
                                     "state = 'receiving'", (site,)).fetchone()
            if max_open is not None and n >= max_open:
                raise QuotaExceeded("too_many_open_uploads", f"site has {n} open uploads (limit {max_open}); finish "
                                    "or wait for them to expire before starting another")
            if max_open_bytes is not None and declared + size > max_open_bytes:
                raise QuotaExceeded("open_bytes_quota", f"site's open uploads would declare {declared + size} bytes "
                                    f"(limit {max_open_bytes}); finish the open ones first")
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

    def expire_uploads(self, idle_before: str) -> list[UploadRow]:
        """Close every receiving upload not updated since ``idle_before`` (rejected, reason "expired")."""
        with self._tx() as db:
            rows = [UploadRow(*r) for r in db.execute(
                f"SELECT {_UPLOAD_COLS} FROM uploads WHERE state = 'receiving' AND updated_at < ?", (idle_before,))]
            for r in rows:
                db.execute("UPDATE uploads SET state = 'rejected', reason = 'expired', updated_at = ? WHERE id = ?",
                           (utcnow(), r.id))
                self._event(db, "upload_expired", r.site, r.tar_sha256, "expired")
        return rows

    def prune_rejected(self, before: str) -> int:
        """Drop the manifest and signature text of uploads rejected before ``before`` (the row, its reason and the
        event stay); returns how many were pruned."""
        with self._tx() as db:
            return db.execute("UPDATE uploads SET manifest = '', signature = '' WHERE state = 'rejected' AND "
                              "updated_at < ? AND (manifest != '' OR signature != '')", (before,)).rowcount

    # ------------------------------------------------------------------ shards and events
    def _shard(self, r: tuple) -> AcceptedShard:
        sha, site, shard_id, upload_id, count, msha, at, status, why = r
        return AcceptedShard(tar_sha256=sha, site=site, shard_id=shard_id, sample_count=count, accepted_at=at,
                             dir=shard_dir(self.state_dir, sha), upload_id=upload_id, manifest_sha256=msha,
                             status=status, status_reason=why)

    def accepted_shards(self, limit: int | None = None) -> list[AcceptedShard]:
        """The shards training may use: accepted and active (not excluded, quarantined or removed), oldest first;
        only the first ``limit`` when given."""
        sql = f"SELECT {_SHARD_COLS} FROM shards WHERE status = 'active' ORDER BY accepted_at, tar_sha256"
        rows = self._query(sql) if limit is None else self._query(sql + " LIMIT ?", (limit,))
        return [self._shard(r) for r in rows]

    def all_shards(self) -> list[AcceptedShard]:
        """Every accepted shard whatever its status."""
        return [self._shard(r) for r in self._query(
            f"SELECT {_SHARD_COLS} FROM shards ORDER BY accepted_at, tar_sha256")]

    def shard(self, tar_sha256: str) -> AcceptedShard | None:
        rows = self._query(f"SELECT {_SHARD_COLS} FROM shards WHERE tar_sha256 = ?", (tar_sha256,))
        return self._shard(rows[0]) if rows else None

    def find_shards(self, prefix: str) -> list[AcceptedShard]:
        """Shards whose tar_sha256 starts with ``prefix`` (at least 8 hex digits) or whose shard_id is ``prefix``."""
        if re.fullmatch(r"[0-9a-f]{8,64}", prefix):
            rows = self._query(f"SELECT {_SHARD_COLS} FROM shards WHERE substr(tar_sha256, 1, ?) = ? OR shard_id = ?",
                               (len(prefix), prefix, prefix))
        else:
            rows = self._query(f"SELECT {_SHARD_COLS} FROM shards WHERE shard_id = ?", (prefix,))
        return [self._shard(r) for r in rows]

    def set_shard_status(self, tar_sha256: str, status: str, reason: str | None) -> AcceptedShard:
        """Move a shard to ``status`` (with the operator's reason), recorded as an event; a removed shard stays
        removed."""
        if status not in SHARD_STATUSES:
            raise ValueError(f"status {status!r} is not one of {SHARD_STATUSES}")
        with self._tx() as db:
            row = db.execute("SELECT site, status FROM shards WHERE tar_sha256 = ?", (tar_sha256,)).fetchone()
            if row is None:
                raise ConfigError([f"no accepted shard {tar_sha256} (see `shards list --all`)"])
            if row[1] == "removed" and status != "removed":
                raise ConfigError([f"shard {tar_sha256[:16]} was removed (its files are gone); the site must upload "
                                   "it again under a new shard id"])
            db.execute("UPDATE shards SET status = ?, status_reason = ? WHERE tar_sha256 = ?",
                       (status, reason, tar_sha256))
            self._event(db, {"active": "shard_included", "excluded": "shard_excluded",
                             "quarantined": "shard_quarantined", "removed": "shard_removed"}[status],
                        row[0], tar_sha256, reason)
        done = self.shard(tar_sha256)
        assert done is not None
        return done

    def record_event(self, kind: str, *, site: str | None = None, shard_sha256: str | None = None,
                     reason: str | None = None) -> None:
        with self._tx() as db:
            self._event(db, kind, site, shard_sha256, reason)

    def events(self, kind: str | None = None) -> list[Event]:
        sql = "SELECT id, time, kind, site, shard_sha256, reason FROM events"
        rows = self._query(sql + " WHERE kind = ? ORDER BY id", (kind,)) if kind else self._query(sql + " ORDER BY id")
        return [Event(*r) for r in rows]
