"""The package stage: aggregate privacy numbers of the filter's output, the export policy verdict,
and the signed shard in WORKDIR/shards/<shard_id>/, registered in the site state."""

from __future__ import annotations

import json
import shutil
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privdistill.data.types import ImageSet
from privdistill.errors import PrivacyPolicyError, ShardVerificationError, StageError
from privdistill.identity import public_key_b64
from privdistill.pipeline import open_filtered_set
from privdistill.privacy_report import Limits, PrivacyReport, evaluate_criteria
from privdistill.prompts import check_prompts
from privdistill.shard import MANIFEST, SHARD_TAR, SIGNATURE, sha256_path, verify_shard_dir, write_shard
from privdistill.stages import STAGE_FILE, Stage, StageContext, sha256_file
from privdistill.workdir import (
    FILTER,
    INGEST,
    REID_ONNX,
    SAMPLE,
    SAMPLES_FILE,
    TRAIN_REID,
    TRAIN_SET,
    WorkDir,
)
from site_agent.audit_log import audit
from site_agent.config import PolicyConfig, SiteConfig, shard_config_hash, vocabulary
from site_agent.records import verify_shard_stages
from site_agent.state import SiteState, workdir_id

log = structlog.get_logger(__name__)

PACKAGE = "package"
UPSTREAM = (INGEST, SAMPLE, FILTER, TRAIN_REID)
SHARDS_DIR = "shards"
REPORT_FILE = "package_report.json"
SHARD_FILES = frozenset({SHARD_TAR, MANIFEST, SIGNATURE})
AUDIT_REPORT = Path("audit") / "report.json"  # `privdistill audit CONFIG --workdir WORKDIR` writes it here
# every number in the privacy section that was computed on the real patients OUTSIDE any DP accountant:
# each says something about those patients that the teacher's epsilon (if any) does not bound
NON_DP_KEYS = ("n_synthetic", "kept", "dropped", "dropped_by_reason", "threshold", "calibration", "reid_pairs", "audit",
               "teacher_memorization_rate", "kept_memorization_rate", "teacher_memorization_undecidable",
               "kept_memorization_undecidable", "teacher_memorization_ci", "kept_memorization_ci",
               "teacher_reid_rate", "kept_reid_rate", "mia")
NON_DP_NOTE = ("computed on this site's real patients without differential privacy; not covered by teacher_dp's "
               "(epsilon, delta), which bounds the teacher's weights and raw samples only")
MIA_KEYS = ("auc", "auc_ci95", "unit", "n_member_units", "n_nonmember_units", "n_members", "n_nonmembers",
            "image_auc", "image_auc_ci95", "tpr_at_fpr", "interval", "dp_covered")


# ----------------------------------------------------------------------------- policy
def policy_limits(policy: PolicyConfig) -> Limits:
    return Limits(
        require_filter=policy.require_filter, max_kept_memorization_rate=policy.max_kept_memorization_rate,
        max_teacher_memorization_rate=policy.max_teacher_memorization_rate,
        min_planted_recall=policy.min_planted_recall, min_recall_lower_bound=policy.min_recall_lower_bound,
        max_fresh_drop_rate=policy.max_fresh_drop_rate, min_kept=policy.min_kept,
        max_teacher_mia_auc=policy.max_teacher_mia_auc, min_mia_patients=policy.min_mia_patients,
        max_epsilon=policy.max_epsilon, max_delta=policy.max_delta,
        require_fingerprint_audit=policy.require_fingerprint_audit,
    )


def evaluate_policy(privacy: dict[str, Any], policy: PolicyConfig) -> dict[str, Any]:
    """Each criterion with its value, limit and result; ``passed`` only if all pass (missing numbers fail).
    The criteria are privdistill.privacy_report's, the same the coordinator's release gate evaluates."""
    criteria = [c.as_dict() for c in evaluate_criteria(PrivacyReport.parse(privacy), policy_limits(policy))]
    failed = [c["name"] for c in criteria if not c["passed"]]
    return {"passed": not failed, "failed": failed, "criteria": criteria}


# ----------------------------------------------------------------------------- privacy numbers
def privacy_aggregate(cfg: SiteConfig, *, filter_report: dict[str, Any], train: ImageSet, samples: ImageSet,
                      kept: ImageSet, reid_onnx: Path) -> dict[str, Any]:
    """Aggregate numbers only (what the manifest carries): memorization and re-identification rates of
    all teacher samples and of the kept ones, and the filter's own report and audit."""
    from privdistill.imaging import at_resolution
    from privdistill.metrics import reid_rate
    from privdistill.privacy_report import number
    from privdistill.reid import OnnxEmbedder

    ratio = cfg.evaluate.memorization_ratio
    train, samples, kept = (at_resolution(d, cfg.analysis_resolution) for d in (train, samples, kept))
    threshold = number(filter_report.get("threshold"))  # the re-id cosine threshold (None: no plain re-id detector)
    embedder = OnnxEmbedder(reid_onnx)
    real_emb = embedder.embed(train.images)
    audit_rep = filter_report.get("audit") or {}
    cal = filter_report.get("calibration") or {}
    pairs = filter_report.get("reid_pairs") or {}

    def reid(images: np.ndarray) -> float | None:
        return None if threshold is None else reid_rate(images, real_emb, embed=embedder.embed, threshold=threshold)

    return {
        "filter_enabled": bool(filter_report.get("filter_enabled")),
        "n_synthetic": int(filter_report.get("n_synthetic", len(samples))),
        "kept": len(kept),
        "dropped": int(filter_report.get("dropped", 0)),
        "dropped_by_reason": filter_report.get("dropped_by_reason", {}),
        "threshold": threshold,
        # the filter's calibration on fresh images (alpha, n_null, per-detector thresholds) and its re-id
        # model's pair diagnostics
        "calibration": {k: cal.get(k) for k in ("method", "alpha", "n_null", "detectors", "alpha_per_detector",
                                                 "thresholds") if k in cal},
        "reid_pairs": {k: pairs.get(k, cal.get(k)) for k in ("tpr", "fpr", "auc")},
        "audit": {k: audit_rep.get(k) for k in ("fresh_drop_rate", "fresh_drop_ci", "fresh_n", "recall", "too_few",
                                                 "planted_recall", "planted_per_kind", "heldout_real_dropped_rate",
                                                 "heldout_real_n") if k in audit_rep},
        "memorization_ratio": ratio,
        **_memorization_numbers(samples, kept, train, ratio),
        "teacher_reid_rate": reid(samples.images),
        "kept_reid_rate": reid(kept.images),
        # the teacher's membership-inference AUC (privdistill.audit.mia; aggregate only), with its interval and n
        "mia": {"teacher": {k: v for k, v in ((filter_report.get("mia") or {}).get("teacher") or {}).items()
                            if k in MIA_KEYS}},
        # the teacher's DP-SGD guarantee (privdistill.dp.dp_summary), only when it was trained with DP
        **({"teacher_dp": filter_report["teacher_dp"]} if filter_report.get("teacher_dp") else {}),
        "non_dp_aggregates": {"keys": list(NON_DP_KEYS), "note": NON_DP_NOTE},
    }


def _memorization_numbers(samples: ImageSet, kept: ImageSet, train: ImageSet, ratio: float) -> dict[str, Any]:
    """Memorization rate, undecidable count and 95% interval of all teacher samples and of the kept ones."""
    from privdistill.metrics import memorization

    out: dict[str, Any] = {}
    for who, images in (("teacher", samples.images), ("kept", kept.images)):
        m = memorization(images, train, ratio=ratio) if len(images) else {"rate": 0.0, "undecidable": 0, "ci": None}
        out |= {f"{who}_memorization_rate": m["rate"], f"{who}_memorization_undecidable": m["undecidable"],
                f"{who}_memorization_ci": m["ci"]}
    return out


def fingerprint_audit_summary(cfg: SiteConfig, workdir: Path) -> dict[str, Any] | None:
    """The aggregate verdict of WORKDIR/audit/report.json (`privdistill audit`) when it audited this very
    configuration; None when there is no audit or it audited another one."""
    from privdistill.audit.fingerprint_audit import audit_config_hash, export_summary

    path = Path(workdir) / AUDIT_REPORT
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    if report.get("settings", {}).get("config_hash") != audit_config_hash(cfg):
        log.warning("package.audit_ignored", reason="the fingerprint audit was run with another configuration")
        return None
    return export_summary(report)


# ----------------------------------------------------------------------------- the stage
def build_package_stage(cfg: SiteConfig, workdir: Path, *, key: Ed25519PrivateKey) -> Stage:
    """A privdistill Stage: skipped while the config, key, upstream outputs and filter record are unchanged."""
    record = WorkDir(Path(workdir)).filter_dir / STAGE_FILE
    audit = Path(workdir) / AUDIT_REPORT
    config = {
        "shard_config_hash": shard_config_hash(cfg),
        "public_key": public_key_b64(key),
        "filter_record_sha256": sha256_file(record) if record.is_file() else None,
        "fingerprint_audit_sha256": sha256_file(audit) if audit.is_file() else None,
    }
    return Stage(PACKAGE, lambda ctx: package(cfg, ctx, key=key), UPSTREAM, config)


def package(cfg: SiteConfig, ctx: StageContext, *, key: Ed25519PrivateKey) -> dict[str, Any]:
    verify_shard_stages(ctx.workdir, key)  # only stages this agent ran (records MAC'd with the site key)
    filter_dir = ctx.input(FILTER)
    kept = open_filtered_set(filter_dir)  # refuses anything but the filter's recorded, patient-id-free output
    vocab = vocabulary(cfg, kept.class_names)
    if kept.prompts is not None:
        try:
            check_prompts(kept.prompts, vocab)
        except ShardVerificationError as err:
            raise PrivacyPolicyError(
                f"refusing to package ({err.reason}): {err}. Prompts may use ASCII letters, digits, spaces and "
                "- , . ' ( ) only, and only words of the allow-listed vocabulary (template words, class names, "
                "site.vocabulary_extra). Prompts must come from data.prompt_template, never from report text; add a "
                "word to site.vocabulary_extra only if it cannot identify anyone") from None
    if len(kept) == 0:
        raise PrivacyPolicyError("the filter kept no synthetic image: nothing to package "
                                 f"(policy min_kept={cfg.site.policy.min_kept}); train longer or sample more")
    filter_report = json.loads((filter_dir / "privacy_report.json").read_text())
    privacy = privacy_aggregate(
        cfg, filter_report=filter_report, train=ImageSet.load(ctx.input(INGEST) / TRAIN_SET),
        samples=ImageSet.load(ctx.input(SAMPLE) / SAMPLES_FILE), kept=kept,
        reid_onnx=ctx.input(TRAIN_REID) / REID_ONNX,
    )
    audit = fingerprint_audit_summary(cfg, ctx.workdir)
    if audit is not None:
        privacy["fingerprint_audit"] = audit
    verdict = evaluate_policy(privacy, cfg.site.policy)
    shard_id, row_state = _write_or_reuse(cfg, ctx.workdir, kept, privacy, verdict, key, vocab)
    report = {"shard_id": shard_id, "state": row_state, "policy": verdict, "privacy": privacy}
    (ctx.out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _provenance(workdir: Path) -> dict[str, str]:
    wid = workdir_id(workdir, create=True)
    assert wid is not None
    return {"filter_record_sha256": sha256_file(WorkDir(workdir).filter_dir / STAGE_FILE),
            "kept_sha256": sha256_file(WorkDir(workdir).kept), "workdir_id": wid}


def _write_or_reuse(cfg: SiteConfig, workdir: Path, kept: ImageSet, privacy: dict[str, Any], verdict: dict[str, Any],
                    key: Ed25519PrivateKey, vocab: list[str]) -> tuple[str, str]:
    """Write the shard under the first free id (``site-<hash12>``, then ``-2``, ``-3``...), or reuse a
    registered one with the same provenance and key. Registered shards are never overwritten."""
    state = SiteState(workdir)
    prov = _provenance(workdir)
    full_hash = shard_config_hash(cfg)
    base = f"{cfg.site.id}-{full_hash[:12]}"
    root = workdir / SHARDS_DIR
    for n in count(1):
        shard_id = base if n == 1 else f"{base}-{n}"
        out = root / shard_id
        row = state.get(shard_id)
        if row is not None:
            if all(getattr(row, k) == v for k, v in prov.items()) and _intact(out, key):
                log.info("package.reused", shard_id=shard_id, state=row.state)
                return shard_id, row.state
            continue
        if out.exists() or out.is_symlink():
            _remove_orphan(out)
        manifest = write_shard(
            kept, out, site_id=cfg.site.id, shard_id=shard_id, config_hash=full_hash,
            privacy={**privacy, "policy": {"passed": verdict["passed"], "failed": verdict["failed"]}},
            key=key, vocabulary=vocab if kept.prompts is not None else [],
        )
        auto = cfg.site.approval == "auto" and verdict["passed"]
        state.register(
            shard_id=shard_id, site_id=cfg.site.id, dir=out, state="approved" if auto else "packaged",
            policy=verdict, manifest_sha256=sha256_path(out / MANIFEST), tar_sha256=manifest.tar_sha256,
            sample_count=manifest.sample_count, approved_by="auto-policy" if auto else None, **prov,
        )
        audit(workdir, "packaged", shard_id=shard_id, site_id=cfg.site.id, sample_count=manifest.sample_count,
              tar_sha256=manifest.tar_sha256, policy_passed=verdict["passed"], failed_criteria=verdict["failed"])
        if auto:
            audit(workdir, "approved", shard_id=shard_id, site_id=cfg.site.id, by="auto-policy")
        log.info("package.done", shard_id=shard_id, samples=manifest.sample_count, policy_passed=verdict["passed"])
        return shard_id, "approved" if auto else "packaged"
    raise AssertionError("unreachable")


def _intact(shard_dir: Path, key: Ed25519PrivateKey) -> bool:
    try:
        verify_shard_dir(shard_dir, public_key_b64(key))
    except ShardVerificationError:
        return False
    return True


def _remove_orphan(out: Path) -> None:
    """A shard folder nobody registered (a run killed between writing and registering) is removed;
    anything else in its place is left for a person to look at."""
    if out.is_dir() and not out.is_symlink() and {p.name for p in out.iterdir()} <= SHARD_FILES \
            and all(p.is_file() and not p.is_symlink() for p in out.iterdir()):
        shutil.rmtree(out)
        return
    raise StageError(f"{out} exists but is not a shard this work directory registered; move it away and re-run")


def shard_root(workdir: Path) -> Path:
    return Path(workdir) / SHARDS_DIR
