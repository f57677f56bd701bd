"""Evaluation stage: privacy (memorization, independent re-identification) and utility (TSTR,
domain FID) of teacher and student samples, written to report.json and report.html."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import structlog

from privdistill.config import RunConfig
from privdistill.data.types import ImageSet
from privdistill.errors import StageError
from privdistill.seeds import derive_seed
from privdistill.stages import StageContext

log = structlog.get_logger(__name__)


def _utility(samples: ImageSet, test: ImageSet, real_clf, cfg: RunConfig, seed: int) -> dict[str, Any]:
    from privdistill.classifier import features
    from privdistill.metrics import fid_domain, tstr_accuracy

    out: dict[str, Any] = {"n_samples": len(samples), "tstr_accuracy": None}
    if samples.labels is not None:
        out["tstr_accuracy"] = tstr_accuracy(
            samples, test, len(test.class_names), steps=cfg.evaluate.classifier_steps,
            batch_size=cfg.evaluate.classifier_batch_size, seed=seed,
        )
    out["fid_domain"] = fid_domain(features(real_clf, test.images), features(real_clf, samples.images))
    return out


def _downstream(report: dict[str, Any], train: ImageSet, test: ImageSet, sets: dict[str, ImageSet],
                cfg: RunConfig) -> None:
    """The ViT / Semi-ViT evaluator when configured: ``real.trtr_<model>`` and ``<name>.tstr_<model>``
    (a label_fraction of the training images labelled, the rest unlabelled), plus what each run saw."""
    ds = cfg.evaluate.downstream
    if ds.model == "cnn":
        return
    from privdistill.downstream import downstream_accuracy

    n_classes, detail = len(test.class_names), {}
    for i, (name, data) in enumerate({"real": train, **sets}.items()):
        key = f"{'trtr' if name == 'real' else 'tstr'}_{ds.model}"
        if data.labels is None:
            report[name][key] = None
            continue
        detail[name] = downstream_accuracy(data.images, data.labels, test.images, test.labels, n_classes, ds,
                                           seed=derive_seed(cfg.seed, "downstream", i))
        report[name][key] = detail[name]["accuracy"]
    report["downstream"] = {"model": ds.model, "label_fraction": ds.label_fraction, **detail}


def _privacy(samples: ImageSet, train: ImageSet, reid_embed, train_emb: np.ndarray, threshold: float,
             cfg: RunConfig, fresh: np.ndarray) -> dict[str, Any]:
    from privdistill.audit.stats import clopper_pearson
    from privdistill.imaging import at_resolution, resize_images
    from privdistill.metrics import memorization, reid_rate

    samples, train = (at_resolution(d, cfg.analysis_resolution) for d in (samples, train))
    fresh = resize_images(fresh, cfg.analysis_resolution)
    # second detector: the same ratio test in the independent re-identification model's feature space
    mem = memorization(samples.images, train, ratio=cfg.evaluate.memorization_ratio, embed=reid_embed)
    reid = reid_rate(samples.images, train_emb, embed=reid_embed, threshold=threshold)
    n = len(samples)
    return {
        "memorization_rate": mem["rate"],
        **_memorization_extra(mem),
        **_copying(samples.images, train, fresh),
        "reid_rate": reid,
        "reid_ci95": clopper_pearson(int(round(reid * n)), n),
        "n_privacy_samples": n,
    }


def _memorization_extra(mem: dict[str, Any]) -> dict[str, Any]:
    """The memorization rate's 95% interval (undecidable samples in its upper end), n and detectors."""
    return {
        "memorization_ci": mem["ci"],
        "memorization_n": mem["n"],
        "memorization_undecidable": mem["undecidable"],
        "memorization_by_detector": mem["by_detector"],
    }


def _copying(images: np.ndarray, train: ImageSet, fresh: np.ndarray, prefix: str = "") -> dict[str, Any]:
    """Data-copying AUC (samples vs fresh real images to the training set; 0.5 = no copying), its 95%
    bootstrap interval and n, under ``{prefix}data_copying_*`` keys."""
    from privdistill.metrics import data_copying

    dc = data_copying(images, train, fresh)
    return {f"{prefix}data_copying_auc": dc["auc"], f"{prefix}data_copying_ci": dc["ci"],
            f"{prefix}data_copying_distance_auc": dc["distance_auc"],
            f"{prefix}data_copying_n": {"samples": dc["n_samples"], "fresh": dc["n_fresh"]}}


def evaluate_run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.classifier import accuracy, train_classifier
    from privdistill.models import DiffusionModel
    from privdistill.pipeline import KEPT_FILE
    from privdistill.reid import train_reid
    from privdistill.report import write_report
    from privdistill.sample import sample_dataset

    train = ImageSet.load(ctx.input("ingest") / "train.npz")
    test = ImageSet.load(ctx.input("ingest") / "test.npz")
    if len(test) == 0 or test.labels is None:
        raise StageError("evaluation needs a labelled real test set (data.test_source or data.test_fraction)")
    teacher_samples = ImageSet.load(ctx.input("sample") / "samples.npz")
    filter_report = json.loads((ctx.input("filter") / "privacy_report.json").read_text())
    student_dir = ctx.input("train-student")
    student = DiffusionModel.load(student_dir / "model")
    prompts_file = student_dir / "prompts.json"
    prompt_labels = json.loads(prompts_file.read_text()) if prompts_file.is_file() else None
    student_samples = sample_dataset(student, cfg.sample, seed=derive_seed(cfg.seed, "student-samples"), prompt_labels=prompt_labels)

    # An independent re-identification model: other architecture, other seed than the filter's.
    seed_ind = cfg.seed + cfg.evaluate.independent_reid_seed_offset
    from privdistill.imaging import at_resolution

    train_a = at_resolution(train, cfg.analysis_resolution)
    reid = train_reid(train_a, cfg.reid, seed=seed_ind, arch="resnet", target_tpr=cfg.evaluate.reid_target_tpr)
    train_emb = reid.embed(train_a.images)

    real_clf = train_classifier(
        train.images, train.labels, len(train.class_names), steps=cfg.evaluate.classifier_steps,
        batch_size=cfg.evaluate.classifier_batch_size, seed=derive_seed(cfg.seed, "eval-classifier"),
    )
    report: dict[str, Any] = {
        "real": {"trtr_accuracy": accuracy(real_clf, test.images, test.labels), "n_train": len(train), "n_test": len(test)},
        "filter": {
            "kept": filter_report["kept"],
            "dropped": filter_report["dropped"],
            "threshold": filter_report["threshold"],
            # the filter's own calibration (alpha, n_null, thresholds) and audit (fresh-drop rate with its
            # interval on a separate held-out set; recall per kind of copy with n and interval)
            "calibration": filter_report.get("calibration", {}),
            "reid_pairs": filter_report.get("reid_pairs", {}),
            "dropped_by_reason": filter_report.get("dropped_by_reason", {}),
            "audit": filter_report.get("audit", {}),
            # fresh real images: the held-out test set (patients disjoint from training)
            **_copying(ImageSet.load(ctx.input("filter") / KEPT_FILE).images, train, test.images, prefix="kept_"),
        },
        **({"teacher_dp": filter_report["teacher_dp"]} if "teacher_dp" in filter_report else {}),
        "independent_reid": {"arch": "resnet", "seed": seed_ind, "threshold": reid.threshold, "calibration": reid.calibration},
    }
    for name, samples, seed in (("teacher", teacher_samples, derive_seed(cfg.seed, "measure-teacher")),
                                ("student", student_samples, derive_seed(cfg.seed, "measure-student"))):
        report[name] = {
            **_privacy(samples, train, reid.embed, train_emb, reid.threshold, cfg, test.images),
            **_utility(samples, test, real_clf, cfg, seed),
        }
        log.info("evaluate.result", model=name, memorization_rate=report[name]["memorization_rate"],
                 reid_rate=report[name]["reid_rate"], tstr_accuracy=report[name]["tstr_accuracy"])
    _downstream(report, train, test, {"teacher": teacher_samples, "student": student_samples}, cfg)
    # membership inference: the teacher's AUC was measured at the sample stage; the student's here, on the
    # same real members (the teacher's training split) and held-out non-members. Headline: student vs teacher.
    from privdistill.audit.mia import run_membership_audit

    teacher_mia = (filter_report.get("mia") or {}).get("teacher") or {}
    student_mia = run_membership_audit(student, ctx.input("ingest"), cfg.data, seed=cfg.seed)
    for name, mia in (("teacher", teacher_mia), ("student", student_mia)):
        report[name]["mia_auc"] = mia.get("auc")
        report[name]["mia_auc_ci95"] = mia.get("auc_ci95")  # patient-level bootstrap
        report[name]["mia_n_patients"] = ([mia.get("n_member_units"), mia.get("n_nonmember_units")]
                                          if mia.get("auc") is not None else None)
    # numbers computed on the real patients outside any DP accountant (see privdistill.budget for what is inside)
    report["non_dp_aggregates"] = ("every number in this report except teacher_dp was computed on the real "
                                   "patients without differential privacy")
    report["membership_inference"] = {"teacher": teacher_mia, "student": student_mia}
    student_samples.save(ctx.out / "student_samples.npz")
    write_report(
        report, ctx.out,
        grids={
            "teacher samples": teacher_samples.images[:48],
            "student samples": student_samples.images[:48],
            "real test images": test.images[:48],
        },
    )
    return report
