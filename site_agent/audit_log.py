"""The site's audit log (privdistill.audit_log) of what was packaged, approved, rejected, refused and exported,
in WORKDIR/audit.log. Never a patient id or the path of a real image: shard ids, hashes, reason codes, the
coordinator URL and the OS user."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any

from privdistill.audit_log import AuditLog

AUDIT_FILE = "audit.log"
EVENTS = ("packaged", "approved", "rejected", "export_refused", "export_failed", "exported",
          "federated_round", "federated_refused")


def operator() -> str:
    """The OS user running the command."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def audit_log(workdir: Path) -> AuditLog:
    """WORKDIR/audit.log."""
    return AuditLog(Path(workdir) / AUDIT_FILE, EVENTS)


def audit(workdir: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one audit record (with the operator: the OS user unless given); returns it. ``fields`` must be
    aggregate (ids, hashes, codes)."""
    return audit_log(workdir).append(event, operator=fields.pop("operator", None) or operator(), **fields)


def read_audit(workdir: Path) -> list[dict[str, Any]]:
    """Every record of WORKDIR/audit.log, oldest first (a torn last line from a crash is skipped)."""
    return audit_log(workdir).read()


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per record: time, event, shard, operator, then the event's details."""
    fixed = ("time", "event", "shard_id", "operator")
    lines = [f"{'time':<26} {'event':<15} {'shard':<34} {'operator':<12} details"]
    for r in records:
        details = " ".join(f"{k}={r[k]}" for k in sorted(r) if k not in fixed and r[k] is not None)
        lines.append(f"{str(r.get('time', '')):<26} {str(r.get('event', '')):<15} {str(r.get('shard_id') or '-'):<34} "
                     f"{str(r.get('operator', '')):<12} {details}")
    return "\n".join(lines)
