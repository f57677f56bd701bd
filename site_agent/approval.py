"""A data steward's decision on a packaged shard: approve or reject it, with an audit record naming who decided.
The CLI (`privdistill-site approve|reject`) and the review page (`privdistill-site ui`) both call these."""

from __future__ import annotations

from pathlib import Path

from privdistill.errors import ConfigError
from site_agent.audit_log import audit, operator
from site_agent.state import ShardRow, SiteState

MAX_REASON_CHARS = 500


def approve_shard(workdir: Path, shard_id: str, *, by: str | None = None) -> ShardRow:
    """packaged -> approved (refused for a policy-failing, rejected or exported shard); audited."""
    by = by or operator()
    row = SiteState(workdir).approve(shard_id, by=by)
    audit(workdir, "approved", shard_id=row.shard_id, site_id=row.site_id, by=by,
          manifest_sha256=row.manifest_sha256)
    return row


def reject_shard(workdir: Path, shard_id: str, *, reason: str, by: str | None = None) -> ShardRow:
    """packaged|approved -> rejected for good; the reason is required and goes into the audit log."""
    reason = " ".join(reason.split())
    if not reason:
        raise ConfigError(["a rejection needs a reason (what the steward saw); it is kept in the audit log"])
    if len(reason) > MAX_REASON_CHARS:
        raise ConfigError([f"the reason is {len(reason)} characters; keep it under {MAX_REASON_CHARS}"])
    by = by or operator()
    row = SiteState(workdir).reject(shard_id, reason=reason, by=by)
    audit(workdir, "rejected", shard_id=row.shard_id, site_id=row.site_id, by=by, reason=reason)
    return row
