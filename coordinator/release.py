"""Releasing the student: the release policy, then a new versioned directory holding the model (diffusers
save_pretrained layout), MODEL_CARD.md, release.json and the sha256 of every file, written atomically."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from coordinator.model_card import NOT_MEASURED, render_model_card
from coordinator.student import (
    EVAL_STAGE,
    GRID_FILE,
    REPORT_FILE,
    TRAIN_STAGE,
    TRAINING_FILE,
    ReleasePolicy,
    Shards,
    TrainingConfig,
    stage_state,
)
from privdistill import __version__
from privdistill.errors import PrivacyPolicyError, StageError
from privdistill.privacy_report import Limits, PrivacyReport, evaluate_criteria
from privdistill.stages import hash_tree, read_record, stage_dir, workdir_lock
from privdistill.workdir import MODEL_DIR, PROMPTS_FILE

log = structlog.get_logger(__name__)

RELEASE_FILE, CARD_FILE, SUMS_FILE = "release.json", "MODEL_CARD.md", "SHA256SUMS"
_COMMAND = {TRAIN_STAGE: "train-student", EVAL_STAGE: "evaluate"}
LATENT_LAYOUT = ("diffusers pipeline folder (model_index.json, vae/, unet/, scheduler/[, text_encoder/, tokenizer/]) "
                 "+ privdistill_model.json; open with diffusers.DiffusionPipeline.from_pretrained(<this directory>) "
                 "(class-conditional: its code is pipeline.py here, so add trust_remote_code=True) or "
                 "privdistill.models.DiffusionModel.load(<this directory>)")
PIXEL_LAYOUT = ("diffusers pipeline folder (model_index.json, unet/, scheduler/[, text_encoder/, tokenizer/]) whose "
                "pipeline code is pipeline.py here (privdistill.hub.PrivdistillPipeline), + privdistill_model.json; "
                "open with diffusers.DiffusionPipeline.from_pretrained(<this directory>, trust_remote_code=True) or "
                "privdistill.models.DiffusionModel.load(<this directory>)")


class ReleaseRefused(PrivacyPolicyError):
    """The release policy (or missing/stale evidence) refused the release; ``failures`` lists every criterion."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"release refused, {len(self.failures)} criterion/criteria failed:\n{lines}")


def load_attestations(paths: list[Path], site_keys: dict[str, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(verified attestations, problems): each path is a student-eval folder or its attestation.json, with
    attestation.sig beside it, signed by an allow-listed (``site_keys``: site -> public key) site."""
    from privdistill.audit.attestation import ATTESTATION, ATTESTATION_SIG, verify_attestation
    from privdistill.errors import ShardVerificationError

    good, problems = [], []
    for p in map(Path, paths):
        doc = p / ATTESTATION if p.is_dir() else p
        sig = doc.with_name(ATTESTATION_SIG)
        if not doc.is_file() or not sig.is_file():
            problems.append(f"site evidence {p}: needs {ATTESTATION} and {ATTESTATION_SIG}")
            continue
        data = doc.read_bytes()
        try:
            site = json.loads(data).get("site_id")
        except (json.JSONDecodeError, AttributeError):
            site = None
        if site not in site_keys:
            problems.append(f"site evidence {p}: site {site!r} is not an allow-listed (non-revoked) site")
            continue
        try:
            good.append(verify_attestation(data, sig.read_text(), site_keys[site]))
        except ShardVerificationError as err:
            problems.append(f"site evidence {p}: {err} ({err.reason})")
    return good, problems


def _attested(training: dict[str, Any], policy: ReleasePolicy, attestations: list[dict[str, Any]],
              model_digest: str | None) -> list[str]:
    """Student criteria measured by the sites: every contributing site must attest this very model."""
    wanted = {"max_student_mia_auc": ("mia_auc_ci95", policy.max_student_mia_auc),
              "max_student_memorization_rate": ("memorization_rate", policy.max_student_memorization_rate)}
    limits = {name: (key, limit) for name, (key, limit) in wanted.items() if limit is not None}
    failures: list[str] = []
    if not limits:
        return failures
    mine = {a["site_id"]: a for a in attestations
            if model_digest is not None and a.get("model_digest") == model_digest}
    for site in sorted({s["site"] for s in training["shards"]}):
        a = mine.get(site)
        for name, (key, limit) in limits.items():
            if a is None:
                failures.append(f"{name}: site {site} has not attested this student (model "
                                f"{str(model_digest)[:12]}); it runs `privdistill-site evaluate-student` on it "
                                "and sends student-eval/attestation.*")
                continue
            student = a["student"]
            value = student.get(key)
            if key == "memorization_rate" and _number(value) and student.get("memorization_undecidable"):
                # samples the metric could not decide count as memorized
                value += student["memorization_undecidable"] / max(int(student.get("n_samples") or 1), 1)
            if key == "mia_auc_ci95":  # the interval's upper end, not the point estimate
                value = value[1] if isinstance(value, list) and len(value) == 2 else None
            if not _number(value):
                failures.append(f"{name}: site {site}'s attestation reports no {key}")
            elif value > limit:
                what = "the upper end of the 95% interval of mia_auc" if key == "mia_auc_ci95" else key
                failures.append(f"{name}: site {site} measured {what} {value:.4f} > {limit}")
        if a is not None and policy.max_student_mia_auc is not None:
            ns = [a["student"].get("mia_n_member_units"), a["student"].get("mia_n_nonmember_units")]
            n = min(ns) if all(_number(x) for x in ns) else None
            if n is None or n < policy.min_student_mia_patients:
                failures.append(f"min_student_mia_patients: site {site}'s student MIA rests on {n} member/non-member "
                                f"patients; the policy needs {policy.min_student_mia_patients}")
    return failures


def _number(v: Any) -> bool:
    """A finite int/float (not a bool): NaN or inf compares False against every limit, so it never passes."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def shard_limits(policy: ReleasePolicy) -> Limits:
    """The release policy's per-shard criteria, in the terms privdistill.privacy_report evaluates for both gates."""
    return Limits(require_filter=policy.require_filter, max_kept_memorization_rate=policy.max_site_kept_memorization_rate,
                  min_planted_recall=policy.min_planted_recall, min_recall_lower_bound=policy.min_recall_lower_bound,
                  max_fresh_drop_rate=policy.max_fresh_drop_rate, max_epsilon=policy.max_epsilon,
                  max_delta=policy.max_delta, require_fingerprint_audit=policy.require_fingerprint_audit)


POLICY_NAMES = {"max_kept_memorization_rate": "max_site_kept_memorization_rate"}  # criterion -> release policy key


def check_policy(training: dict[str, Any], policy: ReleasePolicy, *, attestations: list[dict[str, Any]] | None = None,
                 model_digest: str | None = None) -> list[str]:
    """Every release-policy criterion the trained student fails (empty when it may be released).
    ``attestations``: verified site attestations (see load_attestations) of the model with ``model_digest``."""
    shards = training["shards"]
    sites = sorted({s["site"] for s in shards})
    failures = []
    if len(shards) < policy.min_shards:
        failures.append(f"min_shards: the student was trained on {len(shards)} shard(s); the policy needs "
                        f"{policy.min_shards}")
    if len(sites) < policy.min_sites:
        failures.append(f"min_sites: the student was trained on shards of {len(sites)} site(s) {sites}; the policy "
                        f"needs {policy.min_sites}")
    limits = shard_limits(policy)
    for s in shards:
        who = f"shard {s['site']}/{s['shard_id']} ({s['tar_sha256'][:12]})"
        report = PrivacyReport.parse(s.get("privacy_report"))
        for c in evaluate_criteria(report, limits):
            if not c.passed:
                sep = "" if c.reason.startswith("'") else " "
                failures.append(f"{POLICY_NAMES.get(c.name, c.name)}: {who}{sep}{c.reason}")
    failures += _attested(training, policy, attestations or [], model_digest)
    return failures


def _fingerprint(work_dir: Path, name: str) -> str:
    rec = read_record(work_dir, name)
    if rec is None:
        raise StageError(f"{name}: has not run; run `privdistill-coordinator {_COMMAND[name]}` first")
    return str(rec["fingerprint"])


def _evidence(shards: Shards, cfg: TrainingConfig, work_dir: Path) -> list[str]:
    """Missing or stale train/evaluate stages, and stage outputs changed after they were recorded."""
    failures = []
    for name, state in stage_state(shards, cfg, work_dir).items():
        cmd = f"`privdistill-coordinator {_COMMAND[name]}`"
        if state == "missing":
            failures.append(f"{name}: has not run; run {cmd} first")
        elif state == "stale":
            failures.append(f"{name}: is stale (accepted shards or training config changed since); re-run {cmd}")
        else:
            rec = read_record(work_dir, name)
            if rec is None or hash_tree(stage_dir(work_dir, name)) != rec["outputs"]:
                failures.append(f"{name}: its files changed after the stage wrote them; re-run {cmd} --force")
    return failures


def _next_version(out_dir: Path, name: str) -> int:
    pat = re.compile(rf"^{re.escape(name)}-v(\d+)$")
    found = [int(m.group(1)) for p in out_dir.iterdir() if (m := pat.match(p.name))] if out_dir.is_dir() else []
    return max(found, default=0) + 1


def _release_record(training: dict[str, Any], evaluation: dict[str, Any], cfg: TrainingConfig, version: int,
                    work_dir: Path) -> dict[str, Any]:
    train = training["train"]
    return {
        "format": "privdistill-release/1",
        "name": cfg.name,
        "version": version,
        "released_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "software_version": __version__,
        "model": {
            "conditioning": training["conditioning"], "class_names": training["class_names"],
            "resolution": cfg.resolution, "channels": cfg.channels, "parameters": train.get("parameters"),
            "layout": LATENT_LAYOUT if cfg.student.model.type == "latent" else PIXEL_LAYOUT,
        },
        "training_data": {"kind": "filtered synthetic shards only (no real image)", "n_samples": training["n_samples"],
                          "sites": training["sites"], "shards": training["shards"]},
        "training": {"config": training["config"], "steps": train.get("steps"), "final_loss": train.get("final_loss"),
                     "device": train.get("device")},
        "evaluation": evaluation,
        "evaluation_config": cfg.evaluation.model_dump(mode="json"),
        "sample_config": cfg.sample.model_dump(mode="json"),
        "policy": {**cfg.release.model_dump(mode="json"), "failures": []},
        "stages": {n: _fingerprint(work_dir, n) for n in (TRAIN_STAGE, EVAL_STAGE)},
        "not_measured": NOT_MEASURED,
    }


def release(work_dir: Path, out_dir: Path, cfg: TrainingConfig, *, shards: Shards,
            site_evidence: list[Path] | None = None, site_keys: dict[str, str] | None = None) -> Path:
    """Write ``out_dir/<name>-v<N>`` (N one above the highest present; nothing is ever overwritten) and
    return it. Refuses (ReleaseRefused, a PrivacyPolicyError) listing every failing criterion.
    ``site_evidence``: sites' signed student attestations, checked against ``site_keys`` (site -> public key)."""
    from privdistill.audit.attestation import model_digest

    work_dir, out_dir = Path(work_dir), Path(out_dir)
    with workdir_lock(work_dir):
        failures = _evidence(shards, cfg, work_dir)
        tdir, edir = stage_dir(work_dir, TRAIN_STAGE), stage_dir(work_dir, EVAL_STAGE)
        attestations, problems = load_attestations(list(site_evidence or []), site_keys or {})
        failures += problems
        if (tdir / TRAINING_FILE).is_file():
            digest = model_digest(tdir / MODEL_DIR) if (tdir / MODEL_DIR).is_dir() else None
            failures += check_policy(json.loads((tdir / TRAINING_FILE).read_text()), cfg.release,
                                     attestations=attestations, model_digest=digest)
        if failures:
            log.warning("release.refused", failures=len(failures))
            raise ReleaseRefused(failures)
        training = json.loads((tdir / TRAINING_FILE).read_text())
        evaluation = json.loads((edir / REPORT_FILE).read_text())
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.tmp-", dir=out_dir))
        try:
            shutil.copytree(tdir / MODEL_DIR, tmp, dirs_exist_ok=True)
            for src, name in ((tdir / TRAINING_FILE, TRAINING_FILE), (edir / REPORT_FILE, "evaluation.json"),
                              (edir / GRID_FILE, GRID_FILE), (tdir / PROMPTS_FILE, PROMPTS_FILE)):
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
            version = _next_version(out_dir, cfg.name)
            record = _release_record(training, evaluation, cfg, version, work_dir)
            record["site_attestations"] = attestations  # aggregate numbers the sites signed for this model
            (tmp / CARD_FILE).write_text(render_model_card(record))
            record["files"] = hash_tree(tmp)
            (tmp / RELEASE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            sums = hash_tree(tmp)
            (tmp / SUMS_FILE).write_text("".join(f"{h}  {p}\n" for p, h in sums.items()))
            final = out_dir / f"{cfg.name}-v{version}"
            if final.exists():  # another release took this number meanwhile; never replace a release
                raise PrivacyPolicyError(f"{final} appeared while this release was written; run release again")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("release.written", name=cfg.name, version=version, files=len(sums))
    return final
