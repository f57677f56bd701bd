"""The coordinator's audit trail: one JSON line per event in STATE/audit.log, appended, flushed and fsynced."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import structlog

AUDIT_FILE = "audit.log"
KINDS = frozenset({"upload_created", "duplicate", "accepted", "rejected", "site_added", "site_revoked",
                   "site_key_rotated", "released", "upload_expired", "rejected_pruned", "shard_excluded",
                   "shard_quarantined", "shard_removed", "shard_included"})


class _AppendLogger:
    """structlog logger that appends each rendered line to a file (opened per event: rotation-safe)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write(message + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    info = warning = error = msg


class AuditLog:
    """``AuditLog(state_dir).event("accepted", site=..., shard_sha256=..., reason=None)``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / AUDIT_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = structlog.wrap_logger(
            _AppendLogger(self.path),
            processors=[structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.JSONRenderer()],
        )

    def event(self, kind: str, *, site: str | None = None, shard_sha256: str | None = None,
              reason: str | None = None, **extra: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown audit event kind {kind!r}; one of {sorted(KINDS)}")
        self._log.info(kind, site=site, shard_sha256=shard_sha256, reason=reason, **extra)
