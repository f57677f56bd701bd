"""What the coordinator's monitoring page shows: sites and their last contact, accepted and rejected shards (ledger),
the student's training and loss curve, its evaluation, the latest release with its sample grid, the release gate."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from coordinator.config import CoordinatorConfig
from coordinator.ledger import AcceptedShard, Ledger
from coordinator.release import RELEASE_FILE
from coordinator.student import EVAL_STAGE, GRID_FILE, REPORT_FILE, TRAIN_STAGE, TRAINING_FILE
from privdistill.errors import PrivdistillError
from privdistill.imaging import png_data_uri
from privdistill.web.plots import line_svg

log = structlog.get_logger(__name__)


@dataclass
class Dashboard:
    sites: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[AcceptedShard] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] | None = None  # train-student/training.json
    training_state: str = "not configured"
    steps_planned: int | None = None
    loss_svg: str | None = None
    evaluation: dict[str, Any] | None = None  # evaluate/report.json
    release: dict[str, Any] | None = None  # the newest release's release.json
    release_dir: str | None = None
    samples_png: str | None = None  # data: URI
    samples_from: str | None = None
    gate: list[str] | None = None  # release-policy failures of the trained student now (None: not evaluated)
    notes: list[str] = field(default_factory=list)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _png_uri(path: Path) -> str | None:
    return png_data_uri(path.read_bytes()) if path.is_file() else None


def _manifest_shard_id(text: str) -> str | None:
    try:
        value = json.loads(text).get("shard_id")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def ledger_view(ledger: Ledger, d: Dashboard) -> None:
    d.accepted = ledger.accepted_shards()
    # keyed like the rejection events, whose site and shard hash may be unknown (None)
    shard_ids: dict[tuple[str | None, str | None], str | None] = {
        (u.site, u.tar_sha256): _manifest_shard_id(u.manifest) for u in ledger.uploads("rejected")}
    d.rejected = [{"time": e.time, "site": e.site, "sha": e.shard_sha256, "reason": e.reason,
                   "shard_id": shard_ids.get((e.site, e.shard_sha256))} for e in reversed(ledger.events("rejected"))]
    for s in ledger.sites():
        mine = [a for a in d.accepted if a.site == s.name]
        d.sites.append({"name": s.name, "status": "revoked" if s.revoked else "active", "added_at": s.added_at,
                        "last_seen_at": s.last_seen_at, "accepted": len(mine),
                        "samples": sum(a.sample_count for a in mine),
                        "rejected": sum(1 for r in d.rejected if r["site"] == s.name)})


def _latest_release(releases: Path) -> Path | None:
    found = []
    for p in releases.iterdir() if releases.is_dir() else []:
        m = re.fullmatch(r".+-v(\d+)", p.name)
        if m and (p / RELEASE_FILE).is_file():
            found.append((int(m.group(1)), p.stat().st_mtime, p))
    return max(found)[2] if found else None


def student_view(config: CoordinatorConfig, ledger: Ledger, d: Dashboard) -> None:
    work = config.student_workdir
    if work is not None:
        d.training = _json(work / TRAIN_STAGE / TRAINING_FILE)
        running = any(work.glob(f".{TRAIN_STAGE}.tmp-*"))
        d.training_state = "training now" if running else ("trained" if d.training else "not trained yet")
        if d.training:
            curve = d.training.get("train", {}).get("loss_curve") or []
            d.loss_svg = line_svg([(p[0], p[1]) for p in curve], xlabel="training step", ylabel="diffusion loss",
                                  title="Student training loss (mean over each logging window)")
        d.evaluation = _json(work / EVAL_STAGE / REPORT_FILE)
    if config.releases_dir is not None:
        latest = _latest_release(config.releases_dir)
        if latest is not None:
            d.release, d.release_dir = _json(latest / RELEASE_FILE), latest.name
            d.samples_png, d.samples_from = _png_uri(latest / GRID_FILE), f"release {latest.name}"
    if d.samples_png is None and work is not None:
        d.samples_png, d.samples_from = _png_uri(work / EVAL_STAGE / GRID_FILE), "the evaluated student (not released)"
    if config.training_config is not None and d.training is not None:
        _gate(config, ledger, d)


def _gate(config: CoordinatorConfig, ledger: Ledger, d: Dashboard) -> None:
    """The release gate's verdict on the trained student now: the policy criteria, and stale or missing stages."""
    from coordinator.release import check_policy
    from coordinator.student import ShardRef, load_training_config, stage_state

    assert config.training_config is not None and config.student_workdir is not None and d.training is not None
    try:
        cfg = load_training_config(config.training_config)
        d.steps_planned = cfg.student.train.steps
        d.gate = list(check_policy(d.training, cfg.release))
        refs = [ShardRef(a.dir, a.tar_sha256, a.manifest_sha256 or None) for a in d.accepted]
        for name, state in stage_state(refs, cfg, config.student_workdir).items():
            if state != "current":
                d.gate.append(f"{name}: {state} (accepted shards or training config changed since); re-run it")
    except PrivdistillError as err:
        d.notes.append(f"release gate not evaluated: {err}")
        d.gate = None


def build_dashboard(config: CoordinatorConfig, ledger: Ledger) -> Dashboard:
    d = Dashboard()
    ledger_view(ledger, d)
    student_view(config, ledger, d)
    return d
