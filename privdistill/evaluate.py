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
                                           seed=cfg.seed + 21 + i)
        report[name][key] = detail[name]["accuracy"]
    report["downstream"] = {"model": ds.model, "label_fraction": ds.label_fraction, **detail}


def _privacy(samples: ImageSet, train: ImageSet, reid_embed, train_emb: np.ndarray, threshold: float,
             cfg: RunConfig) -> dict[str, Any]:
    from privdistill.metrics import memorization, reid_rate

    mem = memorization(samples.images, train, ratio=cfg.evaluate.memorization_ratio)
    return {
        "memorization_rate": mem["rate"],
        "reid_rate": reid_rate(samples.images, train_emb, embed=reid_embed, threshold=threshold),
    }


def evaluate_run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.classifier import accuracy, train_classifier
    from privdistill.models import DiffusionModel
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
    student_samples = sample_dataset(student, cfg.sample, seed=cfg.seed + 3, prompt_labels=prompt_labels)

    # An independent re-identification model: other architecture, other seed than the filter's.
    seed_ind = cfg.seed + cfg.evaluate.independent_reid_seed_offset
    reid_cfg = cfg.reid.model_copy(update={"target_tpr": cfg.evaluate.reid_target_tpr})
    reid = train_reid(train, reid_cfg, seed=seed_ind, arch="resnet")
    train_emb = reid.embed(train.images)

    real_clf = train_classifier(
        train.images, train.labels, len(train.class_names), steps=cfg.evaluate.classifier_steps,
        batch_size=cfg.evaluate.classifier_batch_size, seed=cfg.seed + 11,
    )
    report: dict[str, Any] = {
        "real": {"trtr_accuracy": accuracy(real_clf, test.images, test.labels), "n_train": len(train), "n_test": len(test)},
        "filter": {
            "kept": filter_report["kept"],
            "dropped": filter_report["dropped"],
            "threshold": filter_report["threshold"],
            "calibration": {
                "tpr": filter_report["calibration"]["tpr"],
                "fpr": filter_report["calibration"]["fpr"],
            },
            "dropped_by_reason": filter_report.get("dropped_by_reason", {}),
            "audit": filter_report.get("audit", {}),
        },
        **({"teacher_dp": filter_report["teacher_dp"]} if "teacher_dp" in filter_report else {}),
        "independent_reid": {"arch": "resnet", "seed": seed_ind, "threshold": reid.threshold, "calibration": reid.calibration},
    }
    for name, samples, seed in (("teacher", teacher_samples, cfg.seed + 12), ("student", student_samples, cfg.seed + 13)):
        report[name] = {
            **_privacy(samples, train, reid.embed, train_emb, reid.threshold, cfg),
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
    report["teacher"]["mia_auc"] = teacher_mia.get("auc")
    report["student"]["mia_auc"] = student_mia.get("auc")
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
