"""The replay cache: each signed request's (site, nonce) is accepted once while its timestamp is inside the window.

Kept in its own SQLite file (STATE/nonces.sqlite, WAL) rather than in memory, so it holds across a restart and
across several worker processes over the same state directory. Rows live until their timestamp leaves the window
(``max_skew_s`` after it); a site may hold at most ``max_per_site`` live nonces, so the file stays bounded
(sites × max_per_site rows) whatever a registered site sends."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from coordinator.schemas import ApiError
from privdistill.sqlite import ThreadConnections, connect, kept_or_new, transaction

NONCE_FILE = "nonces.sqlite"
PRUNE_EVERY = 256


class ReplayCache:
    """``seen_before(site, nonce, timestamp)`` records the nonce; raises ApiError on a replay or a full cache."""

    def __init__(self, state_dir: Path, *, max_skew_s: int, max_future_skew_s: int, max_per_site: int,
                 keep_open: bool = False) -> None:
        self.path = Path(state_dir) / NONCE_FILE
        self.window_s = max_skew_s + max_future_skew_s
        self.max_skew_s, self.max_per_site = max_skew_s, max_per_site
        self._inserts = 0
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS nonces(site TEXT NOT NULL, nonce TEXT NOT NULL, "
                       "expires REAL NOT NULL, PRIMARY KEY (site, nonce)) WITHOUT ROWID")
            db.execute("CREATE INDEX IF NOT EXISTS nonces_expires ON nonces(expires)")
        finally:
            db.close()
        # an idle connection held open: closing each request's connection then never checkpoints the WAL
        # (see Ledger's keep_open); ``close`` releases it
        self._keepalive: sqlite3.Connection | None = self._connect() if keep_open else None
        self._threads = ThreadConnections(lambda: connect(self.path, check_same_thread=False)) if keep_open else None

    def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.close()
            self._keepalive = None
        if self._threads is not None:
            self._threads.close()

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def record(self, site: str, nonce: str, timestamp: int, *, now: float | None = None) -> None:
        """Accept (site, nonce) once; a second time inside the window is ``replayed_request``."""
        now = time.time() if now is None else now
        with kept_or_new(self._threads, self._connect) as db, transaction(db):  # keep_open: this thread's
            self._inserts += 1
            if self._inserts % PRUNE_EVERY == 0:
                db.execute("DELETE FROM nonces WHERE expires < ?", (now,))
            if db.execute("SELECT 1 FROM nonces WHERE site = ? AND nonce = ?", (site, nonce)).fetchone():
                raise ApiError(401, "replayed_request", "this request (its nonce) was already used; sign every "
                               "request afresh (privdistill.identity.sign_request makes a new nonce)")
            live = db.execute("SELECT COUNT(*) FROM nonces WHERE site = ? AND expires >= ?",
                              (site, now)).fetchone()[0]
            if live >= self.max_per_site:
                raise ApiError(429, "too_many_requests", f"more than {self.max_per_site} requests from this site "
                               f"in {self.window_s} s; slow down", headers={"Retry-After": "30"})
            db.execute("INSERT INTO nonces(site, nonce, expires) VALUES (?, ?, ?)",
                       (site, nonce, timestamp + self.max_skew_s + 1))

    def size(self) -> int:
        db = self._connect()
        try:
            return db.execute("SELECT COUNT(*) FROM nonces").fetchone()[0]
        finally:
            db.close()
