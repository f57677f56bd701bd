"""The append-only audit log (one JSON object per line) that the site and the coordinator each keep of what was
packaged, approved, exported, accepted, refused, released. ("audit" alone names the privacy audits.)

Each record is ``{"time": <ISO 8601 UTC>, "event": <kind>, ...fields}``, written under an exclusive ``flock``
(writers in other threads or processes never interleave) and fsynced (after the lock is released, so concurrent
writers' fsyncs overlap) before ``append`` returns."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TIME_KEY = "time"
EVENT_KEY = "event"


class AuditLog:
    """``AuditLog(path, events).append("exported", shard_id=...)``; an event outside ``events`` is a bug."""

    def __init__(self, path: Path, events: Iterable[str]) -> None:
        self.path = Path(path)
        self.events = frozenset(events)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record and return it. ``fields`` must be aggregate (ids, hashes, codes): never a patient id
        or the path of a real image."""
        if event not in self.events:
            raise ValueError(f"unknown audit event {event!r}; one of {sorted(self.events)}")
        if TIME_KEY in fields or EVENT_KEY in fields:
            raise ValueError(f"{TIME_KEY!r} and {EVENT_KEY!r} are set by the audit log, not by its callers")
        record = {TIME_KEY: datetime.now(UTC).isoformat(), EVENT_KEY: event, **fields}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(line)
            fh.flush()  # the whole line in the file while the lock is held: writers never interleave
            fcntl.flock(fh, fcntl.LOCK_UN)
            # fsync'd outside the lock: concurrent appenders' fsyncs share one journal commit instead of queueing
            # behind each other (a coordinator receiving 20 uploads writes 40 records at once)
            os.fsync(fh.fileno())
        return json.loads(line)  # as a reader will see it (e.g. a Path field as its string)

    def read(self) -> list[dict[str, Any]]:
        """Every record, oldest first; none when the log does not exist (a torn last line from a crash is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
