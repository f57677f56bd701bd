"""Release gates: the coordinator's release policy (shard manifests' privacy aggregates and the sites' signed
student attestations) and the site's export policy each refuse listing EVERY failing criterion, and pass
a good case."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.release import ReleaseRefused, check_policy, load_attestations
from coordinator.student import ReleasePolicy
from privdistill import identity
from privdistill.audit.attestation import ATTESTATION, ATTESTATION_SIG, make_attestation, model_digest
from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError, PrivacyPolicyError
from privdistill.privacy_report import PrivacyReport
from privdistill.stages import atomic_write_json
from site_agent.config import PolicyConfig
from site_agent.gate import ExportRefused, check_export
from site_agent.package import evaluate_policy
from site_agent.state import SiteState

sys.path.insert(0, str(Path(__file__).parent))
from test_export_gate import _stage, filter_report, force_db, make_site

STRICT = ReleasePolicy(min_planted_recall=1.0, max_epsilon=8.0, max_student_mia_auc=0.6,
                       max_student_memorization_rate=0.0)


def _shard(site: str, *, recall: float = 1.0, epsilon: float | None = 4.0, kept_mem: float = 0.0) -> dict[str, Any]:
    privacy = {"filter_enabled": True, "kept_memorization_rate": kept_mem,
               "audit": {"planted_recall": {"exact": 1.0, "shift_1px": recall, "noise_0.1": 1.0, "contrast_0.9": 1.0}},
               "mia": {"teacher": {"auc": 0.7}}, **({} if epsilon is None else {"teacher_dp": {"epsilon": epsilon, "delta": 1e-6}})}
    return {"site": site, "shard_id": f"{site}-abc", "tar_sha256": "ab" * 32,
            "privacy": PrivacyReport.parse(privacy).summary(), "privacy_report": privacy}


def _model(tmp: Path) -> Path:
    d = tmp / "model"
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "weights.bin").write_bytes(b"student weights")
    (d / "privdistill_model.json").write_text("{}")
    return d


def _attest(tmp: Path, site: str, key: Any, model: Path, **numbers: Any) -> Path:
    out = tmp / f"evidence-{site}"
    out.mkdir()
    numbers = {"mia_auc": 0.52, "mia_auc_ci95": [0.40, 0.58], "mia_n_member_units": 30, "mia_n_nonmember_units": 30,
               "memorization_rate": 0.0, **numbers}
    data, sig = make_attestation(site, model, numbers, key)
    (out / ATTESTATION).write_bytes(data)
    (out / ATTESTATION_SIG).write_text(sig + "\n")
    return out


# ----------------------------------------------------------------------------- coordinator release policy
def test_release_policy_lists_every_failing_criterion(tmp_path: Path) -> None:
    # Prepare: site-a's filter missed a shifted copy and spent too much epsilon; site-b trained without DP;
    # site-a attests a leaky student, site-b attests nothing
    key_a = identity.generate_key()
    model = _model(tmp_path)
    training = {"shards": [_shard("site-a", recall=0.9, epsilon=12.0, kept_mem=0.1), _shard("site-b", epsilon=None)]}
    evidence = _attest(tmp_path, "site-a", key_a, model, mia_auc=0.81, mia_auc_ci95=[0.7, 0.9], memorization_rate=0.05)
    attestations, problems = load_attestations([evidence], {"site-a": identity.public_key_b64(key_a)})

    # Execute
    failures = check_policy(training, STRICT, attestations=attestations, model_digest=model_digest(model))

    # Assert
    assert problems == []
    names = [f.split(":")[0] for f in failures]
    assert sorted(names) == sorted([
        "max_site_kept_memorization_rate",  # site-a 0.1 > 0.0
        "min_planted_recall",  # site-a 0.9 < 1.0
        "max_epsilon", "max_epsilon",  # site-a 12 > 8; site-b no DP
        "max_student_mia_auc", "max_student_memorization_rate",  # site-a measured too high
        "max_student_mia_auc", "max_student_memorization_rate",  # site-b did not attest
    ]), failures
    text = "\n".join(failures)
    assert "worst-kind recall 0.9000 < 1.0" in text and "epsilon 12 > 8.0" in text
    assert "site site-a measured the upper end of the 95% interval of mia_auc 0.9000 > 0.6" in text and "site site-b has not attested" in text
    assert "not trained with DP-SGD" in text
    err = ReleaseRefused(failures)
    assert isinstance(err, PrivacyPolicyError) and err.exit_code == 4 and "8 criterion/criteria failed" in str(err)


def test_non_finite_numbers_in_a_manifest_never_pass(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    shard = _shard("site-a", recall=nan, epsilon=nan, kept_mem=nan)

    failures = check_policy({"shards": [shard]}, ReleasePolicy(min_planted_recall=1.0, max_epsilon=8.0))

    names = sorted(f.split(":")[0] for f in failures)
    assert names == ["max_epsilon", "max_site_kept_memorization_rate", "min_planted_recall"], failures
    assert check_policy({"shards": [_shard("site-a", epsilon=inf)]}, ReleasePolicy(max_epsilon=8.0))


def test_release_policy_passes_with_good_numbers_and_every_site_attesting(tmp_path: Path) -> None:
    keys = {s: identity.generate_key() for s in ("site-a", "site-b")}
    model = _model(tmp_path)
    training = {"shards": [_shard("site-a"), _shard("site-b", epsilon=7.9)]}
    evidence = [_attest(tmp_path, s, k, model) for s, k in keys.items()]
    attestations, problems = load_attestations(evidence, {s: identity.public_key_b64(k) for s, k in keys.items()})
    assert problems == [] and len(attestations) == 2
    assert check_policy(training, STRICT, attestations=attestations, model_digest=model_digest(model)) == []
    # the default policy asks for none of the new criteria
    assert check_policy({"shards": [_shard("site-a", recall=0.5, epsilon=None)]}, ReleasePolicy()) == []


def test_the_digest_covers_the_model_files_only_so_a_released_folder_matches_its_candidate(tmp_path: Path) -> None:
    import shutil

    candidate = _model(tmp_path)
    released = tmp_path / "release-v1"
    shutil.copytree(candidate, released)
    for extra in ("MODEL_CARD.md", "release.json", "SHA256SUMS", "training.json", "samples_grid.png"):
        (released / extra).write_text("added by release")

    assert model_digest(released) == model_digest(candidate)
    (released / "unet" / "weights.bin").write_bytes(b"other weights")
    assert model_digest(released) != model_digest(candidate)
    # the pipeline code a user runs with trust_remote_code is part of what the sites attest
    shutil.rmtree(released)
    shutil.copytree(candidate, released)
    (released / "pipeline.py").write_text("import os\n")
    assert model_digest(released) != model_digest(candidate)


def test_attestations_bind_to_the_model_and_the_sites_key(tmp_path: Path) -> None:
    key, other = identity.generate_key(), identity.generate_key()
    model = _model(tmp_path)
    evidence = _attest(tmp_path, "site-a", key, model)
    keys = {"site-a": identity.public_key_b64(key)}

    # another model (one byte changed) is not attested by this document
    attestations, _ = load_attestations([evidence], keys)
    (model / "unet" / "weights.bin").write_bytes(b"student weightz")
    failures = check_policy({"shards": [_shard("site-a")]}, ReleasePolicy(max_student_mia_auc=0.6),
                            attestations=attestations, model_digest=model_digest(model))
    assert len(failures) == 1 and "site site-a has not attested this student" in failures[0]

    # a tampered number, a foreign key and an unknown site are each reported
    doc = json.loads((evidence / ATTESTATION).read_text())
    doc["student"]["mia_auc"] = 0.5
    (evidence / ATTESTATION).write_text(json.dumps(doc))
    _, problems = load_attestations([evidence], keys)
    assert len(problems) == 1 and "bad_signature" in problems[0]
    (tmp_path / "other").mkdir()
    _, problems = load_attestations([_attest(tmp_path / "other", "site-a", other, model)], keys)
    assert len(problems) == 1 and "bad_signature" in problems[0]
    _, problems = load_attestations([evidence], {})
    assert "not an allow-listed" in problems[0]


# ----------------------------------------------------------------------------- the site's export policy
def test_site_policy_checks_teacher_mia_and_epsilon() -> None:
    policy = PolicyConfig(max_teacher_mia_auc=0.6, max_epsilon=8.0)
    good = {"filter_enabled": True, "kept_memorization_rate": 0.0, "kept": 5,
            "audit": {"planted_recall": {"exact": 1.0, "shift_1px": 1.0}},
            "mia": {"teacher": {"auc": 0.55, "auc_ci95": [0.45, 0.58], "n_member_units": 30, "n_nonmember_units": 30}},
            "teacher_dp": {"epsilon": 7.5, "delta": 1e-5}}
    assert evaluate_policy(good, policy)["passed"] is True
    bad = {**good, "mia": {"teacher": {"auc": 0.9, "auc_ci95": [0.8, 0.95], "n_member_units": 30,
                                       "n_nonmember_units": 30}}, "teacher_dp": {"epsilon": 9.0, "delta": 1e-6},
           "audit": {"planted_recall": {"exact": 1.0, "shift_1px": 0.8}}}
    verdict = evaluate_policy(bad, policy)
    assert verdict["failed"] == ["min_planted_recall", "max_teacher_mia_auc", "max_epsilon"]
    no_dp = {k: v for k, v in good.items() if k != "teacher_dp"}
    # epsilon required once it is a criterion (delta is judged only beside an epsilon, at both gates)
    assert evaluate_policy(no_dp, policy)["failed"] == ["max_epsilon"]
    assert evaluate_policy(no_dp, PolicyConfig())["passed"] is True  # not a criterion by default


def test_export_gate_refuses_listing_every_failing_criterion(tmp_path: Path, reid_src: Path) -> None:
    # Prepare: a policy with limits the shard misses three ways (weak planted recall, leaky teacher, no DP)
    s = make_site(tmp_path / "s", reid_src, extra={"policy": {"max_teacher_mia_auc": 0.6, "max_epsilon": 8.0}})
    mia = {"auc": 0.83, "auc_ci95": [0.7, 0.93], "n_member_units": 24, "n_nonmember_units": 24}
    report = filter_report(5, 12, recall=0.75) | {"mia": {"teacher": mia}}
    _stage(s.workdir, "filter", {"kept.npz": ImageSet.load(s.workdir / "filter" / "kept.npz"),
                                 "privacy_report.json": report}, force=True)

    # Execute
    pkg = s.package()
    sid = pkg["shard_id"]
    state = SiteState(s.workdir)
    with pytest.raises(PrivacyPolicyError, match="can never be approved"):
        state.approve(sid, by="steward")
    # a register forced to "approved" is still refused from the signed manifest's numbers
    force_db(s, "UPDATE shards SET state = 'approved', approved_by = 'x', policy_passed = 1, "
                "policy_json = '{\"passed\": true, \"failed\": []}' WHERE shard_id = ?", sid)
    with pytest.raises(ExportRefused) as err:
        check_export(s.workdir, sid, s.cfg)

    # Assert
    # no DP section: max_epsilon fails; delta is judged only beside an epsilon
    assert pkg["policy"]["failed"] == ["min_planted_recall", "max_teacher_mia_auc", "max_epsilon"]
    assert pkg["privacy"]["mia"]["teacher"] == mia
    msg = str(err.value)
    assert err.value.reason == "policy_failed" and "3 criterion/criteria" in msg
    assert "min_planted_recall: 0.75 (limit 1.0)" in msg
    assert "max_teacher_mia_auc: 0.93 (limit 0.6)" in msg and "max_epsilon: None (limit 8.0)" in msg


def test_export_gate_passes_a_shard_within_the_policy(tmp_path: Path, reid_src: Path) -> None:
    s = make_site(tmp_path / "s", reid_src, approval="auto", extra={"policy": {"max_teacher_mia_auc": 0.6}})
    report = filter_report(5, 12) | {"mia": {"teacher": {"auc": 0.54, "auc_ci95": [0.4, 0.59], "n_member_units": 24,
                                                          "n_nonmember_units": 24}}}
    _stage(s.workdir, "filter", {"kept.npz": ImageSet.load(s.workdir / "filter" / "kept.npz"),
                                 "privacy_report.json": report}, force=True)
    pkg = s.package()
    assert pkg["policy"]["passed"] is True
    manifest = check_export(s.workdir, pkg["shard_id"], s.cfg)
    assert manifest.privacy["mia"]["teacher"]["auc"] == 0.54
    atomic_write_json(tmp_path / "seen.json", manifest.privacy)  # JSON-safe aggregate


# ----------------------------------------------------------------------------- one set of criteria for both gates
def _audited(low: float, fresh: float) -> dict[str, Any]:
    return {"filter_enabled": True, "kept_memorization_rate": 0.0, "kept": 5,
            "audit": {"planted_recall": {"exact": 1.0},
                      "fresh_drop_rate": fresh, "fresh_drop_ci": [0.01, 0.09], "fresh_n": 150,
                      "recall": {"exact": {"value": 1.0, "ci": [1.0, 1.0], "n": 50},
                                 "blur_0.5-1px": {"value": 0.9, "ci": [low, 0.97], "n": 50},
                                 "local_mark": {"value": 0.0, "ci": [0.0, 0.0], "n": 3}},  # too few: not judged
                      "too_few": ["local_mark"]}}


def test_recall_lower_bound_and_fresh_drop_mean_the_same_at_the_site_and_the_coordinator() -> None:
    site = PolicyConfig(min_recall_lower_bound=0.8, max_fresh_drop_rate=0.1)
    release_policy = ReleasePolicy(min_recall_lower_bound=0.8, max_fresh_drop_rate=0.1)

    def both(privacy: dict[str, Any]) -> tuple[list[str], list[str]]:
        shard = {"site": "site-a", "shard_id": "a1", "tar_sha256": "ab" * 32, "privacy_report": privacy}
        return (evaluate_policy(privacy, site)["failed"],
                sorted(f.split(":")[0] for f in check_policy({"shards": [shard]}, release_policy)))

    assert both(_audited(0.85, 0.05)) == ([], [])
    assert both(_audited(0.75, 0.05)) == (["min_recall_lower_bound"], ["min_recall_lower_bound"])
    assert both(_audited(0.85, 0.2)) == (["max_fresh_drop_rate"], ["max_fresh_drop_rate"])
    old = {k: v for k, v in _audited(0.85, 0.05).items() if k != "audit"}  # a manifest from before the audit
    assert both(old)[0] == ["min_planted_recall", "min_recall_lower_bound", "max_fresh_drop_rate"]
    shard = {"site": "site-a", "shard_id": "a1", "tar_sha256": "ab" * 32, "privacy_report": _audited(0.75, 0.05)}
    (msg,) = check_policy({"shards": [shard]}, release_policy)
    assert "recall 95% lower bound 0.7500 < 0.8 (kind blur_0.5-1px)" in msg


def test_the_old_require_filter_enabled_key_names_the_new_one() -> None:
    from pydantic import ValidationError

    from privdistill.config_loader import parse_model

    with pytest.raises(ConfigError) as err:
        parse_model(ReleasePolicy, {"require_filter_enabled": True})
    assert err.value.problems == ["require_filter_enabled: renamed to `require_filter` (the same criterion for the "
                                  "site's export gate and the coordinator's release gate); rename the key"]
    with pytest.raises(ConfigError, match="require_filter_enabled: renamed to `require_filter`"):
        parse_model(PolicyConfig, {"require_filter_enabled": True})
    with pytest.raises(ValidationError, match="require_filter_enabled"):  # refused without the loader too
        PolicyConfig.model_validate({"require_filter_enabled": True})


# ----------------------------------------------------------------------------- intervals, n and delta in the gates
def test_release_gate_takes_the_intervals_upper_end_and_a_minimum_n(tmp_path: Path) -> None:
    key = identity.generate_key()
    model = _model(tmp_path)
    keys = {"site-a": identity.public_key_b64(key)}
    policy = ReleasePolicy(max_student_mia_auc=0.6)
    # point estimate 0.52 under the limit, but the interval reaches 0.66: not evidence of <= 0.6
    wide = _attest(tmp_path, "site-a", key, model, mia_auc_ci95=[0.38, 0.66])
    failures = check_policy({"shards": [_shard("site-a")]}, policy, attestations=load_attestations([wide], keys)[0],
                            model_digest=model_digest(model))
    assert failures == ["max_student_mia_auc: site site-a measured the upper end of the 95% interval of mia_auc "
                        "0.6600 > 0.6"]
    (tmp_path / "b").mkdir()
    few = _attest(tmp_path / "b", "site-a", key, model, mia_n_nonmember_units=8)
    failures = check_policy({"shards": [_shard("site-a")]}, policy, attestations=load_attestations([few], keys)[0],
                            model_digest=model_digest(model))
    assert len(failures) == 1 and failures[0].startswith("min_student_mia_patients: site site-a's student MIA rests "
                                                         "on 8 member/non-member patients; the policy needs 20")


def test_release_gate_checks_delta_with_epsilon() -> None:
    shard = _shard("site-a", epsilon=4.0)
    shard["privacy_report"]["teacher_dp"]["delta"] = 3.3e-3  # 1/(10 N) at N = 30
    failures = check_policy({"shards": [shard]}, ReleasePolicy(max_epsilon=8.0))
    assert len(failures) == 1 and failures[0].startswith("max_delta:") and "0.0033 > 1e-05" in failures[0]


def test_site_policy_takes_the_intervals_upper_end_min_patients_and_delta() -> None:
    policy = PolicyConfig(max_teacher_mia_auc=0.6, max_epsilon=8.0)
    base = {"filter_enabled": True, "kept_memorization_rate": 0.0, "kept": 5,
            "audit": {"planted_recall": {"exact": 1.0}}, "teacher_dp": {"epsilon": 7.5, "delta": 1e-6}}
    mia = {"auc": 0.51, "auc_ci95": [0.40, 0.63], "n_member_units": 30, "n_nonmember_units": 30}
    verdict = evaluate_policy({**base, "mia": {"teacher": mia}}, policy)
    assert verdict["failed"] == ["max_teacher_mia_auc"]
    assert verdict["criteria"][-4] == {"name": "max_teacher_mia_auc", "value": 0.63, "limit": 0.6, "passed": False}
    few = {**mia, "auc_ci95": [0.45, 0.55], "n_nonmember_units": 12}
    assert evaluate_policy({**base, "mia": {"teacher": few}}, policy)["failed"] == ["min_mia_patients"]
    big_delta = {**base, "teacher_dp": {"epsilon": 7.5, "delta": 3.3e-3}, "mia": {"teacher": {**mia, "auc_ci95": [0.4, 0.6]}}}
    assert evaluate_policy(big_delta, policy)["failed"] == ["max_delta"]


def test_gates_can_require_a_fingerprint_audit_through_the_student() -> None:
    good = {"passed": True, "n_failures": 0, "through_student": {"carrying": {"k": 0, "n": 60}}}
    policy = ReleasePolicy(require_fingerprint_audit=True)
    shards = [_shard("a"), _shard("b"), _shard("c"), _shard("d")]
    shards[0]["privacy_report"]["fingerprint_audit"] = good
    shards[1]["privacy_report"]["fingerprint_audit"] = {**good, "through_student": None}
    shards[2]["privacy_report"]["fingerprint_audit"] = {**good, "passed": False, "n_failures": 1}
    failures = check_policy({"shards": shards}, policy)
    assert [f.split(": ", 1)[1].split(" ", 2)[1] for f in failures] == ["b/b-abc", "c/c-abc", "d/d-abc"]
    assert "stopped at the teacher" in failures[0] and "failed (1 reason(s))" in failures[1]
    assert "no fingerprint audit" in failures[2]
    site = PolicyConfig(require_fingerprint_audit=True)
    base = {"filter_enabled": True, "kept_memorization_rate": 0.0, "kept": 5, "audit": {"planted_recall": {"x": 1.0}}}
    assert evaluate_policy({**base, "fingerprint_audit": good}, site)["passed"] is True
    v = evaluate_policy({**base, "fingerprint_audit": {**good, "through_student": None}}, site)
    assert v["failed"] == ["require_fingerprint_audit"] and v["criteria"][-1]["value"] == "passed, not through the student"
    assert evaluate_policy(base, site)["failed"] == ["require_fingerprint_audit"]
