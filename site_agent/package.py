"""The package stage: aggregate privacy numbers of the filter's output, the export policy verdict,
and the signed shard in WORKDIR/shards/<shard_id>/, registered in the site state."""

from __future__ import annotations

import json
import math
import shutil
from itertools import count
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privdistill.data.types import ImageSet
from privdistill.errors import PrivacyPolicyError, ShardVerificationError, StageError
from privdistill.identity import public_key_b64
from privdistill.pipeline import KEPT_FILE, open_filtered_set
from privdistill.prompts import check_prompts
from privdistill.shard import MANIFEST, SHARD_TAR, SIGNATURE, sha256_path, verify_shard_dir, write_shard
from privdistill.stages import STAGE_FILE, Stage, StageContext, read_record, sha256_file
from site_agent.audit import audit
from site_agent.config import PolicyConfig, SiteConfig, shard_config_hash, vocabulary
from site_agent.records import verify_shard_stages
from site_agent.state import SiteState, workdir_id

log = structlog.get_logger(__name__)

PACKAGE = "package"
UPSTREAM = ("ingest", "sample", "filter", "train-reid")
SHARDS_DIR = "shards"
REPORT_FILE = "package_report.json"
SHARD_FILES = frozenset({SHARD_TAR, MANIFEST, SIGNATURE})


# ----------------------------------------------------------------------------- policy
def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def evaluate_policy(privacy: dict[str, Any], policy: PolicyConfig) -> dict[str, Any]:
    """Each criterion with its value, limit and result; ``passed`` only if all pass (missing numbers fail)."""
    criteria: list[dict[str, Any]] = []

    def check(name: str, value: Any, limit: Any, ok: bool) -> None:
        criteria.append({"name": name, "value": value, "limit": limit, "passed": bool(ok)})

    if policy.require_filter:
        check("require_filter", privacy.get("filter_enabled"), True, privacy.get("filter_enabled") is True)
    v = _num(privacy.get("kept_memorization_rate"))
    check("max_kept_memorization_rate", v, policy.max_kept_memorization_rate,
          v is not None and v <= policy.max_kept_memorization_rate)
    if policy.max_teacher_memorization_rate is not None:
        v = _num(privacy.get("teacher_memorization_rate"))
        check("max_teacher_memorization_rate", v, policy.max_teacher_memorization_rate,
              v is not None and v <= policy.max_teacher_memorization_rate)
    recall = (privacy.get("audit") or {}).get("planted_recall") or {}
    values = [_num(x) for x in recall.values()] if isinstance(recall, dict) else []
    worst = min(values) if values and None not in values else None  # type: ignore[type-var]
    check("min_planted_recall", worst, policy.min_planted_recall, worst is not None and worst >= policy.min_planted_recall)
    kept = privacy.get("kept")
    ok = isinstance(kept, int) and not isinstance(kept, bool) and kept >= policy.min_kept
    check("min_kept", kept, policy.min_kept, ok)
    if policy.max_teacher_mia_auc is not None:
        v = _num(((privacy.get("mia") or {}).get("teacher") or {}).get("auc"))
        check("max_teacher_mia_auc", v, policy.max_teacher_mia_auc, v is not None and v <= policy.max_teacher_mia_auc)
    if policy.max_epsilon is not None:  # no DP section: the teacher was trained without DP, epsilon is unbounded
        v = _num((privacy.get("teacher_dp") or {}).get("epsilon"))
        check("max_epsilon", v, policy.max_epsilon, v is not None and v <= policy.max_epsilon)
    failed = [c["name"] for c in criteria if not c["passed"]]
    return {"passed": not failed, "failed": failed, "criteria": criteria}


# ----------------------------------------------------------------------------- privacy numbers
def privacy_aggregate(cfg: SiteConfig, *, filter_report: dict[str, Any], train: ImageSet, samples: ImageSet,
                      kept: ImageSet, reid_onnx: Path) -> dict[str, Any]:
    """Aggregate numbers only (what the manifest carries): memorization and re-identification rates of
    all teacher samples and of the kept ones, and the filter's own report and audit."""
    from privdistill.metrics import memorization, reid_rate
    from privdistill.reid import OnnxEmbedder

    ratio = cfg.evaluate.memorization_ratio
    threshold = float(filter_report["threshold"])
    embedder = OnnxEmbedder(reid_onnx)
    real_emb = embedder.embed(train.images)
    audit_rep = filter_report.get("audit") or {}
    cal = filter_report.get("calibration") or {}
    return {
        "filter_enabled": bool(filter_report.get("filter_enabled")),
        "n_synthetic": int(filter_report.get("n_synthetic", len(samples))),
        "kept": len(kept),
        "dropped": int(filter_report.get("dropped", 0)),
        "dropped_by_reason": filter_report.get("dropped_by_reason", {}),
        "threshold": threshold,
        "calibration": {k: cal.get(k) for k in ("tpr", "fpr", "auc")},
        "audit": {k: audit_rep.get(k) for k in ("planted_recall", "planted_per_kind", "heldout_real_dropped_rate",
                                                 "heldout_real_n")},
        "memorization_ratio": ratio,
        "teacher_memorization_rate": memorization(samples.images, train, ratio=ratio)["rate"],
        "kept_memorization_rate": memorization(kept.images, train, ratio=ratio)["rate"] if len(kept) else 0.0,
        "teacher_reid_rate": reid_rate(samples.images, real_emb, embed=embedder.embed, threshold=threshold),
        "kept_reid_rate": reid_rate(kept.images, real_emb, embed=embedder.embed, threshold=threshold),
        # the teacher's membership-inference AUC (privdistill.audit.mia; aggregate only)
        "mia": {"teacher": {k: ((filter_report.get("mia") or {}).get("teacher") or {}).get(k)
                            for k in ("auc", "n_members", "n_nonmembers")}},
        # the teacher's DP-SGD guarantee (privdistill.dp.dp_summary), only when it was trained with DP
        **({"teacher_dp": filter_report["teacher_dp"]} if filter_report.get("teacher_dp") else {}),
    }


# ----------------------------------------------------------------------------- the stage
def build_package_stage(cfg: SiteConfig, workdir: Path, *, key: Ed25519PrivateKey) -> Stage:
    """A privdistill Stage: skipped while the config, key, upstream outputs and filter record are unchanged."""
    record = Path(workdir) / "filter" / STAGE_FILE
    config = {
        "shard_config_hash": shard_config_hash(cfg),
        "public_key": public_key_b64(key),
        "filter_record_sha256": sha256_file(record) if record.is_file() else None,
    }
    return Stage(PACKAGE, lambda ctx: package(cfg, ctx, key=key), UPSTREAM, config)


def package(cfg: SiteConfig, ctx: StageContext, *, key: Ed25519PrivateKey) -> dict[str, Any]:
    verify_shard_stages(ctx.workdir, key)  # only stages this agent ran (records MAC'd with the site key)
    filter_dir = ctx.input("filter")
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
        cfg, filter_report=filter_report, train=ImageSet.load(ctx.input("ingest") / "train.npz"),
        samples=ImageSet.load(ctx.input("sample") / "samples.npz"), kept=kept,
        reid_onnx=ctx.input("train-reid") / "reid.onnx",
    )
    verdict = evaluate_policy(privacy, cfg.site.policy)
    shard_id, row_state = _write_or_reuse(cfg, ctx.workdir, kept, privacy, verdict, key, vocab)
    report = {"shard_id": shard_id, "state": row_state, "policy": verdict, "privacy": privacy}
    (ctx.out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _provenance(workdir: Path) -> dict[str, str]:
    wid = workdir_id(workdir, create=True)
    assert wid is not None
    return {"filter_record_sha256": sha256_file(workdir / "filter" / STAGE_FILE),
            "kept_sha256": sha256_file(workdir / "filter" / KEPT_FILE), "workdir_id": wid}


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


def package_done(workdir: Path) -> bool:
    return read_record(Path(workdir), PACKAGE) is not None
