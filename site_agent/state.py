"""The site's shard register (SQLite in WORKDIR/site_state.sqlite): each shard's state, policy verdict,
manifest hash and local provenance. Provenance stays here; it is never written into a manifest."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privdistill.errors import PrivacyPolicyError, StageError
from privdistill.sqlite import connection, require_existing

STATE_FILE = "site_state.sqlite"
WORKDIR_ID_FILE = ".workdir_id"
STATES = ("packaged", "approved", "rejected", "exported")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    shard_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    dir TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('packaged', 'approved', 'rejected', 'exported')),
    policy_json TEXT NOT NULL,
    policy_passed INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    tar_sha256 TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    filter_record_sha256 TEXT NOT NULL,
    kept_sha256 TEXT NOT NULL,
    workdir_id TEXT NOT NULL,
    approved_by TEXT,
    reason TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    exported_at TEXT,
    destination TEXT,
    upload_id TEXT
);
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def workdir_id(workdir: Path, *, create: bool = False) -> str | None:
    """This work directory's random id (made once; a copied shard carries another directory's id)."""
    path = Path(workdir) / WORKDIR_ID_FILE
    if not path.is_file() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(16) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
    return path.read_text().strip() if path.is_file() else None


@dataclass(frozen=True)
class ShardRow:
    shard_id: str
    site_id: str
    dir: Path
    state: str
    policy: dict[str, Any]
    policy_passed: bool
    manifest_sha256: str
    tar_sha256: str
    sample_count: int
    filter_record_sha256: str
    kept_sha256: str
    workdir_id: str
    approved_by: str | None
    reason: str | None
    created_at: str
    updated_at: str
    exported_at: str | None
    destination: str | None
    upload_id: str | None

    def public(self) -> dict[str, Any]:
        """What `shards --json` prints (local provenance hashes included; it is a local listing)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["dir"] = str(self.dir)
        return out


class SiteState:
    """Shard register of one work directory. Every state change is one conditional UPDATE."""

    def __init__(self, workdir: Path, *, read_only: bool = False) -> None:
        """The register of ``workdir`` (created on first use); ``read_only``: an existing one for reading only (list
        commands), ConfigError when there is none, so a mistyped --workdir creates nothing."""
        self.workdir = Path(workdir)
        self.path = self.workdir / STATE_FILE
        self.read_only = read_only
        if read_only:
            require_existing(self.path, "ledger", "check --workdir (the site's shard register is created when "
                             "`privdistill-site run` packages the first shard)")
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return connection(self.path, timeout=30, synchronous="FULL", wal=True, rows=True, read_only=self.read_only)

    def register(self, *, shard_id: str, site_id: str, dir: Path, state: str, policy: dict[str, Any],
                 manifest_sha256: str, tar_sha256: str, sample_count: int, filter_record_sha256: str,
                 kept_sha256: str, workdir_id: str, approved_by: str | None = None) -> ShardRow:
        """Record a freshly packaged shard (state packaged, or approved when auto-approved)."""
        if state not in ("packaged", "approved"):
            raise ValueError(f"a new shard is packaged or approved, not {state!r}")
        if state == "approved" and not policy.get("passed"):
            raise PrivacyPolicyError(f"shard {shard_id} fails the export policy and cannot be approved")
        t = now()
        with self._db() as db:
            db.execute(
                "INSERT INTO shards (shard_id, site_id, dir, state, policy_json, policy_passed, manifest_sha256,"
                " tar_sha256, sample_count, filter_record_sha256, kept_sha256, workdir_id, approved_by,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (shard_id, site_id, str(dir), state, json.dumps(policy, sort_keys=True), int(bool(policy.get("passed"))),
                 manifest_sha256, tar_sha256, sample_count, filter_record_sha256, kept_sha256, workdir_id,
                 approved_by, t, t),
            )
        return self.require(shard_id)

    def get(self, shard_id: str) -> ShardRow | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM shards WHERE shard_id = ?", (shard_id,)).fetchone()
        return None if row is None else _row(row)

    def require(self, shard_id: str) -> ShardRow:
        row = self.get(shard_id)
        if row is None:
            raise StageError(f"no shard {shard_id!r} in this work directory; list them with `privdistill-site shards`")
        return row

    def list(self) -> list[ShardRow]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM shards ORDER BY created_at, shard_id").fetchall()
        return [_row(r) for r in rows]

    def approve(self, shard_id: str, *, by: str) -> ShardRow:
        """packaged -> approved; refused for a policy-failing, rejected or exported shard."""
        row = self.require(shard_id)
        if not row.policy_passed:
            failed = ", ".join(row.policy.get("failed", [])) or "unknown"
            raise PrivacyPolicyError(
                f"shard {shard_id} fails the export policy ({failed}) and can never be approved; change the "
                "training/filter settings, run `privdistill-site run` again and review the new shard")
        self._transition(shard_id, ("packaged",), "approved", approved_by=by,
                         refuse=f"shard {shard_id} is {row.state}; only a packaged shard can be approved")
        return self.require(shard_id)

    def reject(self, shard_id: str, *, reason: str, by: str) -> ShardRow:
        """packaged|approved -> rejected (final)."""
        row = self.require(shard_id)
        self._transition(shard_id, ("packaged", "approved"), "rejected", reason=reason, approved_by=by,
                         refuse=f"shard {shard_id} is {row.state}; only a packaged or approved shard can be rejected")
        return self.require(shard_id)

    def mark_exported(self, shard_id: str, *, destination: str, upload_id: str) -> ShardRow:
        self._transition(shard_id, ("approved",), "exported", destination=destination, upload_id=upload_id,
                         exported_at=now(), refuse=f"shard {shard_id} is no longer approved; not marked exported")
        return self.require(shard_id)

    def _transition(self, shard_id: str, from_states: tuple[str, ...], to: str, *, refuse: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in ("state", "updated_at", *fields))
        marks = ",".join("?" for _ in from_states)
        with self._db() as db:
            cur = db.execute(f"UPDATE shards SET {sets} WHERE shard_id = ? AND state IN ({marks})",
                             (to, now(), *fields.values(), shard_id, *from_states))
        if cur.rowcount != 1:
            raise PrivacyPolicyError(refuse)


def _row(r: sqlite3.Row) -> ShardRow:
    d = dict(r)
    return ShardRow(
        shard_id=d["shard_id"], site_id=d["site_id"], dir=Path(d["dir"]), state=d["state"],
        policy=json.loads(d["policy_json"]), policy_passed=bool(d["policy_passed"]),
        manifest_sha256=d["manifest_sha256"], tar_sha256=d["tar_sha256"], sample_count=d["sample_count"],
        filter_record_sha256=d["filter_record_sha256"], kept_sha256=d["kept_sha256"], workdir_id=d["workdir_id"],
        approved_by=d["approved_by"], reason=d["reason"], created_at=d["created_at"], updated_at=d["updated_at"],
        exported_at=d["exported_at"], destination=d["destination"], upload_id=d["upload_id"],
    )
