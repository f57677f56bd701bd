"""The fingerprint audit (`privdistill audit`): plant K fingerprints into copies of K patients' training
images, train a teacher on that data, measure t' per fingerprint, count fingerprinted free samples and
which patient each maps to, and check that the run's filter drops every one of them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from privdistill.audit.detector import detector_accuracy, train_detector
from privdistill.audit.fingerprints import plant
from privdistill.audit.stats import rate_with_interval
from privdistill.audit.tprime import DEFAULT_SEEDS, model_tprime, samples_needed, tprime_difference
from privdistill.config import RunConfig
from privdistill.data.types import ImageSet
from privdistill.errors import PrivacyPolicyError
from privdistill.filter import FilterResult, filter_synthetic
from privdistill.seeds import derive_seed
from privdistill.workdir import WorkDir

log = structlog.get_logger(__name__)

MAX_DETECTOR_HELDOUT = 500


def map_to_fingerprinted(samples: np.ndarray, fingerprinted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest fingerprinted training image, its pixel L2 distance) for each sample."""
    from privdistill.pixel import knn

    d, i = knn(samples.reshape(len(samples), -1), fingerprinted.reshape(len(fingerprinted), -1), k=1)
    return i[:, 0].astype(np.int64), d[:, 0]


def survivors(carrier: np.ndarray, result: FilterResult) -> np.ndarray:
    """Indices of fingerprint-carrying samples that the filter kept."""
    return np.intersect1d(np.flatnonzero(carrier), result.kept)


def _teacher(cfg: RunConfig, data: ImageSet, steps: int | None) -> tuple[Any, dict[str, Any]]:
    from privdistill.models import DiffusionModel
    from privdistill.train import train_diffusion

    tcfg = cfg.teacher.train if steps is None else cfg.teacher.train.model_copy(update={"steps": steps})
    model = DiffusionModel.from_config(cfg.teacher.model, resolution=cfg.data.resolution, channels=cfg.data.channels,
                                       class_names=data.class_names, prompts=data.prompts, seed=cfg.seed)
    privacy = cfg.privacy
    if privacy is not None and privacy.dp is not None:  # audit the teacher the run would train: DP-SGD when the config asks for it
        from privdistill.dp import train_teacher_dp

        # the audit's DP teacher sees the same real patients: charged to the same ledger and budget
        report = train_teacher_dp(model, data, tcfg, privacy.dp, seed=cfg.seed, resolution=cfg.data.resolution,
                                  channels=cfg.data.channels, budget=privacy.budget)
    else:
        report = train_diffusion(model, data, tcfg, seed=cfg.seed)
    return model, {k: v for k, v in report.items() if k != "loss_curve"}


def _free_samples(model: Any, cfg: RunConfig, data: ImageSet, n: int) -> ImageSet:
    from privdistill.sample import prompt_label_map, sample_dataset

    groups = len(model.class_names) if model.conditioning == "class" else len(set(data.prompts or [])) or 1
    scfg = cfg.sample.model_copy(update={"per_class": max(1, math.ceil(n / groups))})
    return sample_dataset(model, scfg, seed=derive_seed(cfg.seed, "teacher-samples"), prompt_labels=prompt_label_map(data) or None)


def run_fingerprint_audit(
    cfg: RunConfig, workdir: Path, *, fingerprints: int, out_dir: Path | None = None, steps: int | None = None,
    n_samples: int = 200, seeds: int = DEFAULT_SEEDS, detector_steps: int = 400, doses: tuple[int, ...] = (1,),
    student: bool = True, student_steps: int | None = None,
) -> dict[str, Any]:
    """Run the audit and write ``report.json``, ``report.md`` and a local review grid into ``out_dir``
    (default WORKDIR/audit). With ``student`` (default) it continues end to end: a student is trained on the
    filter's kept set, sampled, and searched for fingerprints (rate with interval beside the detector's
    baseline on unmarked images), and t' is measured on it too. Raises PrivacyPolicyError (exit 4) AFTER
    writing the report when the audit fails (see audit_failures)."""
    from privdistill.audit.report import write_audit_report
    from privdistill.pipeline import run_pipeline
    from privdistill.reid import OnnxEmbedder, load_reid

    if seeds < 16:
        log.warning("fingerprint_audit.few_seeds", seeds=seeds, advice="use >= 16 noise seeds per level")
    workdir = Path(workdir)
    out_dir = Path(out_dir) if out_dir is not None else workdir / "audit"
    run_pipeline(cfg, workdir, stages=["ingest", "train-reid"])  # the run's own split and filter model
    train = ImageSet.load(WorkDir(workdir).train_set)
    test = ImageSet.load(WorkDir(workdir).test_set)

    planted = plant(train, fingerprints, seed=cfg.seed, doses=doses)
    fps, idx = planted.fingerprints, planted.indices
    clean_idx = np.setdiff1d(np.arange(len(train)), idx)
    model, teacher_report = _teacher(cfg, planted.data, steps)

    detector = train_detector(train.images[clean_idx], fps, steps=detector_steps, seed=cfg.seed)
    held = test.images[:MAX_DETECTOR_HELDOUT] if len(test) else train.images[clean_idx][:MAX_DETECTOR_HELDOUT]
    det_acc = detector_accuracy(detector, held, fps, seed=cfg.seed)
    baseline_k = int(np.asarray(detector.detect(held), bool).sum())  # unmarked real images the detector flags

    # t' of the fingerprinted images, and of a control: other patients' images given the same fingerprints
    # only now (the teacher never saw them fingerprinted), i.e. what denoising alone brings back
    fp_set = planted.data.subset(idx)
    rng = np.random.default_rng([cfg.seed, 0xC0])
    pids = np.asarray(train.patient_ids) if train.patient_ids is not None else np.arange(len(train)).astype(str)
    others = np.flatnonzero(~np.isin(pids, pids[idx]))
    ctrl_idx = rng.choice(others, size=min(len(idx), len(others)), replace=False) if len(others) else idx[:0]
    ctrl = train.subset(ctrl_idx)
    for j, fp in enumerate(fps[: len(ctrl)]):
        ctrl.images[j] = fp.apply(ctrl.images[j : j + 1])[0]
    tp = model_tprime(model, fp_set, detector.detect, seeds=seeds, full_steps=cfg.sample.steps)
    tc = model_tprime(model, ctrl, detector.detect, seeds=seeds, full_steps=cfg.sample.steps) if len(ctrl) else None

    samples = _free_samples(model, cfg, planted.data, n_samples)
    carrier = detector.detect(samples.images)
    nearest, dist = map_to_fingerprinted(samples.images, planted.images)

    reid = load_reid(WorkDir(workdir).reid_model)
    embed = OnnxEmbedder(WorkDir(workdir).reid_onnx).embed
    active = cfg.filter.model_copy(update={"enabled": True})
    result = filter_synthetic(samples, planted.data, embed=embed, threshold=reid.threshold, cfg=active)
    kept_carriers = survivors(carrier, result)
    dropped = set(result.dropped.tolist())
    exact = filter_synthetic(fp_set, planted.data, embed=embed, threshold=reid.threshold, cfg=active)

    through = _through_student(cfg, samples.subset(result.kept), fp_set, ctrl, detector, n_samples=n_samples,
                               seeds=seeds, steps=student_steps, baseline=(baseline_k, len(held))) \
        if student and len(result.kept) else None

    per_fp = []
    for j, (fp, i) in enumerate(zip(fps, idx, strict=True)):
        mine = carrier & (nearest == j)
        row = {
            "fingerprint": j, **fp.to_dict(), "training_index": int(i),
            "patient_id": None if train.patient_ids is None else str(train.patient_ids[i]),
            "label": None if train.labels is None else train.class_names[int(train.labels[i])],
            "dose": None if planted.doses is None else planted.doses[j],
            "t_prime": tp["t_prime"][j], "t_prime_fraction": tp["t_prime_fraction"][j],
            "t_prime_bracket": tp["bracket"][j], "reproduced_by_level": tp["levels"][j],
            "control_t_prime": None if tc is None or j >= len(tc["t_prime"]) else tc["t_prime"][j],
            "free_samples_carrying": int(mine.sum()),
        }
        if tc is not None and j < len(tc["t_prime"]):
            d = tprime_difference(tp["outcomes"][j], tc["outcomes"][j], seed=cfg.seed + j)
            row["t_prime_minus_control"], row["t_prime_minus_control_ci95"] = d["difference"], d["ci95"]
        if through is not None and through.get("t_prime") is not None:
            row["student_t_prime"] = through["t_prime"]["t_prime"][j]
        per_fp.append(row)
    for rec in (tp, tc):
        if rec is not None:
            rec.pop("outcomes", None)
    if through is not None and through.get("t_prime") is not None:
        through["t_prime"].pop("outcomes", None)
    n_carry = int(carrier.sum())
    report: dict[str, Any] = {
        "name": cfg.name,
        "fingerprints": per_fp,
        "settings": {"k": fingerprints, "teacher_steps": teacher_report.get("steps"), "noise_seeds": seeds,
                     "t_prime_search": {k: tp[k] for k in ("t_min", "t_max", "tol", "definition")},
                     "num_train_timesteps": tp["num_train_timesteps"], "n_samples": len(samples),
                     "ddim_steps": cfg.sample.steps, "detector_steps": detector_steps, "seed": cfg.seed,
                     "doses": list(doses), "through_student": bool(student), "config_hash": audit_config_hash(cfg)},
        "teacher": teacher_report,
        "detector": {"heldout": det_acc, "false_positive_rate_note": "held-out real images without a fingerprint",
                     "baseline": rate_with_interval(baseline_k, len(held))},
        "t_prime": {
            "median": float(np.median(tp["t_prime"])), "max": int(max(tp["t_prime"])),
            "median_fraction": float(np.median(tp["t_prime_fraction"])),
            "control_median": None if tc is None else float(np.median(tc["t_prime"])),
            "by_dose": _by_dose(per_fp),
        },
        "free_samples": {
            "n": len(samples), "carrying_fingerprint": n_carry, "fraction": n_carry / max(1, len(samples)),
            "carrying": rate_with_interval(n_carry, len(samples)),
            "distinct_fingerprints": int(len(set(nearest[carrier].tolist()))),
            "carriers": [{"sample": int(s), "fingerprint": int(nearest[s]), "pixel_distance": float(dist[s]),
                          "dropped_by_filter": int(s) in dropped, "reasons": list(result.reasons[s])}
                         for s in np.flatnonzero(carrier)],
        },
        "filter": {
            "threshold": result.threshold, "pixel_threshold": result.pixel_threshold,
            "fingerprinted_samples": n_carry, "dropped": n_carry - len(kept_carriers),
            "recall": None if n_carry == 0 else (n_carry - len(kept_carriers)) / n_carry,
            "survivors": [int(s) for s in kept_carriers],
            "exact_copies_of_fingerprinted_images_dropped": int(len(exact.dropped)),
            "exact_copies_recall": len(exact.dropped) / len(fp_set),
            "dropped_all_samples": int(len(result.dropped)),
        },
        "student": through,
        "probability_bound": _probability_bound(n_carry, len(samples), through),
    }
    report["failures"] = audit_failures(report)
    report["passed"] = not report["failures"]
    write_audit_report(report, out_dir, samples=samples.images[carrier], matched=planted.images[nearest[carrier]],
                       fingerprinted=planted.images)
    log.info("fingerprint_audit.done", k=fingerprints, median_t_prime=report["t_prime"]["median"],
             carriers=n_carry, survivors=len(kept_carriers),
             student_carriers=None if through is None else through["carrying"]["k"])
    raise_if_survivors(report, out_dir)
    return report


def _through_student(cfg: RunConfig, kept: ImageSet, fp_set: ImageSet, ctrl: ImageSet, detector: Any, *,
                     n_samples: int, seeds: int, steps: int | None, baseline: tuple[int, int]) -> dict[str, Any]:
    """Train the student on the filter's kept set (as the pipeline would), sample it, and count student
    samples carrying a fingerprint, beside the detector's rate on unmarked images; t' on the student."""
    from privdistill.models import DiffusionModel
    from privdistill.train import train_diffusion

    scfg = cfg.student_config
    tcfg = scfg.train if steps is None else scfg.train.model_copy(update={"steps": steps})
    student = DiffusionModel.from_config(scfg.model, resolution=cfg.data.resolution, channels=cfg.data.channels,
                                         class_names=kept.class_names, prompts=kept.prompts, seed=derive_seed(cfg.seed, "student-train"))
    rep = train_diffusion(student, kept, tcfg, seed=derive_seed(cfg.seed, "student-train"))
    out_samples = _free_samples(student, cfg, kept, n_samples)
    k = int(np.asarray(detector.detect(out_samples.images), bool).sum())
    carrying, base = rate_with_interval(k, len(out_samples)), rate_with_interval(*baseline)
    same_classes = student.class_names == fp_set.class_names or student.conditioning != "class"
    tps = model_tprime(student, fp_set, detector.detect, seeds=seeds, full_steps=cfg.sample.steps) \
        if same_classes else None
    tcs = model_tprime(student, ctrl, detector.detect, seeds=seeds, full_steps=cfg.sample.steps) \
        if same_classes and len(ctrl) else None
    # more carriers than the detector's noise on unmarked images: one-sided Fisher exact test at 5%
    from scipy.stats import fisher_exact

    p_value = float(fisher_exact([[k, len(out_samples) - k], [baseline[0], baseline[1] - baseline[0]]],
                                 alternative="greater")[1])
    above = p_value < 0.05
    return {
        "train_steps": rep.get("steps"), "n_kept": len(kept), "n_samples": len(out_samples),
        "carrying": carrying, "unmarked_baseline": base, "above_baseline": bool(above),
        "above_baseline_p_value": p_value, "above_baseline_test": "one-sided Fisher exact, 5%",
        "t_prime": tps, "t_prime_median": None if tps is None else float(np.median(tps["t_prime"])),
        "control_t_prime_median": None if tcs is None else float(np.median(tcs["t_prime"])),
        "note": "student trained on the filter's kept samples of the fingerprinted teacher; carriers counted by "
                "the fingerprint detector; baseline = the detector's positive rate on unmarked held-out images",
    }


def _by_dose(per_fp: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in sorted({f["dose"] for f in per_fp if f.get("dose") is not None}):
        rows = [f for f in per_fp if f.get("dose") == d]
        diffs = [f["t_prime_minus_control"] for f in rows if f.get("t_prime_minus_control") is not None]
        out[str(d)] = {"n": len(rows), "median_t_prime": float(np.median([f["t_prime"] for f in rows])),
                       "median_minus_control": float(np.median(diffs)) if diffs else None,
                       "free_samples_carrying": int(sum(f["free_samples_carrying"] for f in rows))}
    return out


def _probability_bound(k: int, n: int, through: dict[str, Any] | None) -> dict[str, Any]:
    """An exact upper bound on the per-sample probability of generating a fingerprinted (identifiable)
    image, from the free samples (teacher, and student when measured). The paper's own bound (Dombrowski
    & Kainz) needs its formula, which we could not read; this is the binomial bound on what was measured."""
    teacher = rate_with_interval(k, n)
    out: dict[str, Any] = {
        "teacher_upper95": teacher["ci95"][1] if teacher["ci95"] else None, "teacher_n": n,
        "student_upper95": None if through is None else through["carrying"]["ci95"][1],
        "student_n": None if through is None else through["carrying"]["n"],
        "method": "Clopper-Pearson upper end of the carrier rate among free samples",
        "paper_bound": None,
        "paper_bound_needs": "the probability bound of Dombrowski & Kainz needs its formula (not in what we could "
                             "read); to bound the per-sample rate at 1e-3 (1e-4) with zero carriers takes "
                             f"{samples_needed(1e-3)} ({samples_needed(1e-4)}) free samples",
    }
    return out


MIN_DETECTOR_TPR = 0.9
AUDIT_SECTIONS = ("data", "teacher", "student", "reid", "sample", "filter", "privacy")


def audit_config_hash(cfg: RunConfig) -> str:
    """Hash of the config sections the audit depends on: an audit counts as evidence for a run only when
    this matches (the site section of a site config is not part of it)."""
    from privdistill.config import config_hash

    return config_hash({k: cfg.section(k) for k in AUDIT_SECTIONS})


def export_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The audit's aggregate verdict that may leave the site in a shard manifest: no patient, no image,
    no per-fingerprint row."""
    st = report.get("student") or None
    return {
        "passed": bool(report.get("passed")), "n_failures": len(report.get("failures") or []),
        "k": report["settings"]["k"], "noise_seeds": report["settings"]["noise_seeds"],
        "doses": report["settings"].get("doses"), "config_hash": report["settings"].get("config_hash"),
        "t_prime_median": report["t_prime"]["median"], "control_t_prime_median": report["t_prime"]["control_median"],
        "teacher_free_samples": report["free_samples"].get("carrying"),
        "filter_survivors": len(report["filter"]["survivors"]),
        "through_student": None if st is None else {
            "carrying": st["carrying"], "unmarked_baseline": st["unmarked_baseline"],
            "above_baseline": st["above_baseline"], "t_prime_median": st["t_prime_median"]},
    }


def audit_failures(report: dict[str, Any]) -> list[str]:
    """Every reason the audit does not pass: a fingerprinted sample or an exact fingerprinted copy kept by the
    filter, student samples carrying fingerprints above the detector's unmarked baseline (Fisher exact, 5%),
    or a detector too weak for "no carrier found" to mean anything."""
    flt, det = report["filter"], report["detector"]["heldout"]
    failures = []
    if flt["survivors"]:
        failures.append(f"{len(flt['survivors'])} of {flt['fingerprinted_samples']} fingerprinted free samples "
                        f"survived the filter (samples {flt['survivors']})")
    if flt["exact_copies_recall"] < 1.0:
        failures.append(f"the filter kept exact copies of fingerprinted training images (recall "
                        f"{flt['exact_copies_recall']:.3f})")
    st = report.get("student")
    if st and st.get("above_baseline"):
        c, b = st["carrying"], st["unmarked_baseline"]
        failures.append(f"fingerprints reached the student: {c['k']} of {c['n']} student samples carry one "
                        f"(95% CI {c['ci95'][0]:.4f}-{c['ci95'][1]:.4f}) against the detector's baseline {b['k']} of "
                        f"{b['n']} unmarked images (one-sided Fisher exact p = {st.get('above_baseline_p_value')})")
    if det["true_positive_rate"] < MIN_DETECTOR_TPR:
        failures.append(f"the fingerprint detector finds only {det['true_positive_rate']:.3f} of held-out "
                        f"fingerprinted images (< {MIN_DETECTOR_TPR}): 'no carrier found' would mean nothing; "
                        "train it longer (detector_steps) or use larger fingerprints")
    return failures


def raise_if_survivors(report: dict[str, Any], out_dir: Path) -> None:
    """PrivacyPolicyError (exit 4) listing every reason the audit failed (after the report was written)."""
    if report["failures"]:
        raise PrivacyPolicyError(
            "fingerprint audit FAILED: " + "; ".join(report["failures"]) + ". If the filter kept fingerprinted "
            "images it misses identifiable ones: raise filter.max_fresh_drop (lower calibrated thresholds) or "
            f"filter.pixel_ratio and re-run (report: {out_dir})")
