"""The privacy report a shard carries (its manifest's ``privacy`` section, written by the site's package
stage) as a typed model, and the ONE set of export/release criteria over it: the site's export gate
(site_agent.package.evaluate_policy) and the coordinator's release gate (coordinator.release.check_policy)
both call :func:`evaluate_criteria`, so a criterion means the same number on both sides."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

PLANTED_KINDS = ("exact", "shift_1px", "noise_0.1", "contrast_0.9")


def number(v: Any) -> float | None:
    """A finite int/float (not a bool), else None: NaN or inf never passes a limit."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class _Loose(BaseModel):
    # manifests are signed by sites that may run another privdistill version: keys this version does not
    # know are kept (and ignored by the criteria), a known key of the wrong type becomes None, never an error
    model_config = ConfigDict(extra="allow")


class RecallEstimate(_Loose):
    value: float | None = None
    ci: list[float] | None = None  # 95% interval [lo, hi] (patient-level bootstrap)
    n: int = 0
    n_patients: int | None = None


class FilterAuditReport(_Loose):
    fresh_drop_rate: float | None = None
    fresh_drop_ci: list[float] | None = None  # 95% Clopper-Pearson [lo, hi]
    fresh_n: int | None = None
    recall: dict[str, RecallEstimate] = {}
    too_few: list[str] = []
    planted_recall: dict[str, float | None] = {}
    planted_per_kind: int | None = None
    heldout_real_dropped_rate: float | None = None
    heldout_real_n: int | None = None


class FilterCalibrationReport(_Loose):
    alpha: float | None = None
    n_null: int | None = None
    thresholds: dict[str, float] = {}


class TeacherMia(_Loose):
    auc: float | None = None
    auc_ci95: list[float] | None = None  # patient-level bootstrap 95% interval [lo, hi]
    n_members: int | None = None
    n_nonmembers: int | None = None
    n_member_units: int | None = None  # patients behind the AUC (scores aggregated per patient)
    n_nonmember_units: int | None = None


class MiaSection(_Loose):
    teacher: TeacherMia = TeacherMia()


class TeacherDp(_Loose):
    epsilon: float | None = None
    delta: float | None = None


class PolicyVerdict(_Loose):
    passed: bool | None = None
    failed: list[str] = []


class PrivacyReport(_Loose):
    """A shard's aggregate privacy numbers (site_agent.package.privacy_aggregate)."""

    filter_enabled: bool | None = None
    n_synthetic: int | None = None
    kept: int | None = None
    dropped: int | None = None
    threshold: float | None = None
    calibration: FilterCalibrationReport = FilterCalibrationReport()
    audit: FilterAuditReport = FilterAuditReport()
    memorization_ratio: float | None = None
    teacher_memorization_rate: float | None = None
    kept_memorization_rate: float | None = None
    # samples the memorization metric could not decide (counted as memorized by the criteria) and the
    # rate's 95% Wilson interval with the undecidable ones on the memorized side
    teacher_memorization_undecidable: int | None = None
    kept_memorization_undecidable: int | None = None
    teacher_memorization_ci: list[float] | None = None
    kept_memorization_ci: list[float] | None = None
    teacher_reid_rate: float | None = None
    kept_reid_rate: float | None = None
    mia: MiaSection = MiaSection()
    teacher_dp: TeacherDp | None = None
    policy: PolicyVerdict | None = None
    # the fingerprint audit's aggregate verdict (privdistill.audit.fingerprint_audit.export_summary), when run
    fingerprint_audit: dict[str, Any] | None = None
    # which of these numbers are computed on real patients outside any DP guarantee
    non_dp_aggregates: dict[str, Any] | None = None

    @classmethod
    def parse(cls, raw: Any) -> PrivacyReport:
        """Validate a manifest's privacy section; numbers that are not numbers (NaN stays NaN) fail their criteria."""
        if not isinstance(raw, dict):
            return cls()
        try:
            return cls.model_validate(raw)
        except ValidationError:  # a malformed field: keep what validates, drop the rest
            fields = {}
            for k, v in raw.items():
                try:
                    cls.model_validate({k: v})
                    fields[k] = v
                except ValidationError:
                    continue
            return cls.model_validate(fields)

    def memorization_with_undecidable(self, who: str) -> float | None:
        """``{who}_memorization_rate`` (who: teacher or kept) with the samples the metric could not decide
        counted as memorized, so an undecidable sample never passes a gate silently."""
        v = number(getattr(self, f"{who}_memorization_rate"))
        und = getattr(self, f"{who}_memorization_undecidable") or 0
        n = self.kept if who == "kept" else self.n_synthetic
        if v is not None and und:
            v = v + und / n if isinstance(n, int) and n > 0 else None
        return v

    def summary(self) -> dict[str, Any]:
        """The flat numbers the coordinator's pages and model card show for a shard (None where missing)."""
        a = self.audit
        return {
            "filter_enabled": self.filter_enabled, "threshold": self.threshold,
            "alpha": self.calibration.alpha, "n_null": self.calibration.n_null,
            "n_synthetic": self.n_synthetic, "kept": self.kept, "dropped": self.dropped,
            "planted_recall": a.planted_recall or None,
            "recall": {k: r.model_dump(include={"value", "ci", "n"}) for k, r in a.recall.items()} or None,
            "recall_too_few": list(a.too_few),
            "fresh_drop_rate": a.fresh_drop_rate if a.fresh_drop_rate is not None else a.heldout_real_dropped_rate,
            "fresh_drop_ci": a.fresh_drop_ci, "fresh_n": a.fresh_n if a.fresh_n is not None else a.heldout_real_n,
            "memorization_ratio": self.memorization_ratio,
            "teacher_memorization_rate": self.teacher_memorization_rate,
            "kept_memorization_rate": self.kept_memorization_rate,
            "teacher_memorization_undecidable": self.teacher_memorization_undecidable,
            "kept_memorization_undecidable": self.kept_memorization_undecidable,
            "teacher_reid_rate": self.teacher_reid_rate, "kept_reid_rate": self.kept_reid_rate,
            "site_policy_passed": None if self.policy is None else self.policy.passed,
            "teacher_mia_auc": self.mia.teacher.auc,
            "teacher_mia_auc_ci95": self.mia.teacher.auc_ci95,
            "teacher_mia_n_member_units": self.mia.teacher.n_member_units,
            "teacher_mia_n_nonmember_units": self.mia.teacher.n_nonmember_units,
            "non_dp_aggregates": (self.non_dp_aggregates or {}).get("keys"),
            "fingerprint_audit": self.fingerprint_audit,
            "teacher_dp_epsilon": None if self.teacher_dp is None else self.teacher_dp.epsilon,
            "teacher_dp_delta": None if self.teacher_dp is None else self.teacher_dp.delta,
        }


# ----------------------------------------------------------------------------- the criteria
@dataclass(frozen=True)
class Limits:
    """What a policy asks of a shard's privacy report; None = not a criterion."""

    require_filter: bool = True
    max_kept_memorization_rate: float | None = None
    max_teacher_memorization_rate: float | None = None
    min_planted_recall: float | None = None  # worst of the four planted kinds (point estimate)
    min_recall_lower_bound: float | None = None  # worst 95% lower bound over the audited kinds with enough cases
    max_fresh_drop_rate: float | None = None  # the audit's fresh-drop rate on held-out patients (point estimate)
    min_kept: int | None = None
    max_teacher_mia_auc: float | None = None  # compared with the UPPER end of the patient-level 95% interval
    min_mia_patients: int | None = None  # fewest member / non-member patients behind that AUC
    max_epsilon: float | None = None
    max_delta: float | None = None  # checked with max_epsilon
    require_fingerprint_audit: bool = False  # a passed fingerprint audit of this config, through the student


@dataclass(frozen=True)
class Criterion:
    name: str
    value: Any
    limit: Any
    passed: bool
    reason: str  # why, in words, for a refusal message

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "passed": self.passed}


def _ci_low(ci: list[float] | None) -> float:
    """The lower end of an interval for ordering; a missing or non-finite one sorts first."""
    low = number(ci[0]) if ci else None
    return -1.0 if low is None else low


def _worst(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if values and len(present) == len(values) else None


def evaluate_criteria(report: PrivacyReport | dict[str, Any], limits: Limits) -> list[Criterion]:
    """Every criterion ``limits`` sets, evaluated on ``report`` (a missing or non-finite number fails)."""
    r = report if isinstance(report, PrivacyReport) else PrivacyReport.parse(report)
    out: list[Criterion] = []

    def add(name: str, value: Any, limit: Any, ok: bool, reason: str) -> None:
        out.append(Criterion(name, value, limit, bool(ok), reason))

    if limits.require_filter:
        fe = r.filter_enabled
        add("require_filter", fe, True, fe is True,
            "was filtered with the filter disabled" if fe is False
            else "does not state that its re-identification filter was enabled")
    if limits.max_kept_memorization_rate is not None:
        v, lim = r.memorization_with_undecidable("kept"), limits.max_kept_memorization_rate
        add("max_kept_memorization_rate", v, lim, v is not None and v <= lim,
            "reports no kept-set memorization rate; the site must measure it before exporting" if v is None
            else f"reports {v:.4f} > {lim}")
    if limits.max_teacher_memorization_rate is not None:
        v, lim = r.memorization_with_undecidable("teacher"), limits.max_teacher_memorization_rate
        add("max_teacher_memorization_rate", v, lim, v is not None and v <= lim,
            "reports no teacher memorization rate" if v is None else f"reports {v:.4f} > {lim}")
    if limits.min_planted_recall is not None:
        pr = r.audit.planted_recall
        v, lim = _worst([number(x) for x in pr.values()]) if pr else None, limits.min_planted_recall
        add("min_planted_recall", v, lim, v is not None and v >= lim,
            "reports no planted-copy recall of its filter" if v is None
            else f"reports a worst-kind recall {v:.4f} < {lim}")
    if limits.min_recall_lower_bound is not None:
        lim = limits.min_recall_lower_bound
        measured = {k: e for k, e in r.audit.recall.items() if k not in r.audit.too_few}
        lows = [number(e.ci[0]) if e.ci else None for e in measured.values()]
        v = _worst(lows) if measured else None
        worst_kind = min(measured, key=lambda k: _ci_low(measured[k].ci)) if measured else None
        add("min_recall_lower_bound", v, lim, v is not None and v >= lim,
            "reports no per-kind recall interval of its filter" if v is None
            else f"reports a recall 95% lower bound {v:.4f} < {lim} (kind {worst_kind})")
    if limits.max_fresh_drop_rate is not None:
        a = r.audit
        v = number(a.fresh_drop_rate if a.fresh_drop_rate is not None else a.heldout_real_dropped_rate)
        lim = limits.max_fresh_drop_rate
        add("max_fresh_drop_rate", v, lim, v is not None and v <= lim,
            "reports no fresh-drop rate of its filter" if v is None
            else f"reports its filter drops {v:.4f} > {lim} of fresh images of new patients")
    if limits.min_kept is not None:
        k = r.kept
        ok = isinstance(k, int) and not isinstance(k, bool) and k >= limits.min_kept
        add("min_kept", k, limits.min_kept, ok, f"holds {k} kept image(s) < {limits.min_kept}")
    if limits.max_teacher_mia_auc is not None:
        # the upper end of the patient-level 95% interval: a point estimate under the limit is not evidence
        m, lim = r.mia.teacher, limits.max_teacher_mia_auc
        ci = m.auc_ci95
        v = number(ci[1]) if isinstance(ci, list) and len(ci) == 2 else None
        add("max_teacher_mia_auc", v, lim, v is not None and v <= lim,
            "reports no teacher membership-inference AUC interval" if v is None
            else f"reports a teacher MIA AUC 95% upper bound {v:.4f} > {lim}")
        if limits.min_mia_patients is not None:
            ns = [m.n_member_units, m.n_nonmember_units]
            counts = [x for x in ns if isinstance(x, int) and not isinstance(x, bool)]
            n = min(counts) if len(counts) == len(ns) else None
            add("min_mia_patients", n, limits.min_mia_patients, n is not None and n >= limits.min_mia_patients,
                f"'s teacher MIA AUC rests on {n} patient(s) per side < {limits.min_mia_patients}")
    if limits.max_epsilon is not None:  # no DP section: the teacher was trained without DP, epsilon is unbounded
        dp = r.teacher_dp
        v, lim = number(None if dp is None else dp.epsilon), limits.max_epsilon
        add("max_epsilon", v, lim, v is not None and v <= lim,
            f"'s teacher was not trained with DP-SGD (no epsilon in its manifest); the policy needs epsilon <= {lim}"
            if v is None else f"'s teacher spent epsilon {v:.4g} > {lim}")
        if limits.max_delta is not None and v is not None:
            d = number(None if dp is None else dp.delta)
            add("max_delta", d, limits.max_delta, d is not None and d <= limits.max_delta,
                f"'s teacher reports delta {d} > {limits.max_delta} (a guarantee at a large delta allows exposing "
                "some patients outright)")
    if limits.require_fingerprint_audit:
        fa = r.fingerprint_audit
        ok = isinstance(fa, dict) and fa.get("passed") is True and fa.get("through_student") is not None
        value = None if not isinstance(fa, dict) else ("passed" if fa.get("passed") is True else "failed") + \
            ("" if fa.get("through_student") is not None else ", not through the student")
        if not isinstance(fa, dict):
            reason = "carries no fingerprint audit of its configuration"
        elif fa.get("through_student") is None:
            reason = "'s fingerprint audit stopped at the teacher (run it without --no-student)"
        else:
            reason = f"'s fingerprint audit failed ({fa.get('n_failures')} reason(s))"
        add("require_fingerprint_audit", value, "passed, through the student", ok, reason)
    return out


# the policy key require_filter_enabled, renamed (config_loader.Strict.renamed of both policy sections)
RENAMED_REQUIRE_FILTER = ("renamed to `require_filter` (the same criterion for the site's export gate and the "
                          "coordinator's release gate); rename the key")


__all__ = ["Criterion", "Limits", "PrivacyReport", "evaluate_criteria", "RENAMED_REQUIRE_FILTER", "number"]
