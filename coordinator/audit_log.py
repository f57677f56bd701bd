"""The coordinator's audit log, STATE/audit.log (privdistill.audit_log): uploads, acceptances, refusals, site
changes and releases; every record names the site, the shard's sha256 and the reason code (None where they do not apply)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privdistill import audit_log

AUDIT_FILE = "audit.log"
KINDS = frozenset({"upload_created", "duplicate", "accepted", "rejected", "site_added", "site_revoked",
                   "site_key_rotated", "released", "upload_expired", "rejected_pruned", "shard_excluded",
                   "shard_quarantined", "shard_removed", "shard_included"})


class AuditLog(audit_log.AuditLog):
    """``AuditLog(state_dir).event("accepted", site=..., shard_sha256=..., reason=None)``."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(Path(state_dir) / AUDIT_FILE, KINDS)

    def event(self, kind: str, *, site: str | None = None, shard_sha256: str | None = None,
              reason: str | None = None, **extra: Any) -> dict[str, Any]:
        return self.append(kind, site=site, shard_sha256=shard_sha256, reason=reason, **extra)
