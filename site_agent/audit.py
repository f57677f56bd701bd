"""The site's audit trail of what was packaged, approved, rejected, refused and exported: one JSON
line per event (structlog), appended to WORKDIR/audit.log with flush+fsync. Never a patient id or
the path of a real image: shard ids, hashes, reason codes, the coordinator URL and the OS user."""

from __future__ import annotations

import fcntl
import getpass
import json
import os
from pathlib import Path
from typing import Any

import structlog

AUDIT_FILE = "audit.log"
EVENTS = ("packaged", "approved", "rejected", "export_refused", "export_failed", "exported",
          "federated_round", "federated_refused")


def operator() -> str:
    """The OS user running the command."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


class _AppendFsync:
    """structlog output: append one line, flush and fsync before returning (under an exclusive lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def msg(self, message: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(message + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    info = msg


def audit(workdir: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one audit record; returns it. ``fields`` must be aggregate (ids, hashes, codes)."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}; events are {EVENTS}")
    record: dict[str, Any] = {}

    def keep(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        record.update(event_dict)
        return event_dict

    logger = structlog.wrap_logger(
        _AppendFsync(Path(workdir) / AUDIT_FILE),
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            keep,
            structlog.processors.JSONRenderer(sort_keys=True, default=str),
        ],
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
    )
    logger.info(event, operator=fields.pop("operator", None) or operator(), **fields)
    return record


def read_audit(workdir: Path) -> list[dict[str, Any]]:
    """Every record of WORKDIR/audit.log, oldest first (a torn last line from a crash is skipped)."""
    path = Path(workdir) / AUDIT_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per record: time, event, shard, operator, then the event's details."""
    fixed = ("time", "event", "shard_id", "operator")
    lines = [f"{'time':<26} {'event':<15} {'shard':<34} {'operator':<12} details"]
    for r in records:
        details = " ".join(f"{k}={r[k]}" for k in sorted(r) if k not in fixed and r[k] is not None)
        lines.append(f"{str(r.get('time', '')):<26} {str(r.get('event', '')):<15} {str(r.get('shard_id') or '-'):<34} "
                     f"{str(r.get('operator', '')):<12} {details}")
    return "\n".join(lines)
