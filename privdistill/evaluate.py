"""Evaluation stage: privacy (memorization, independent re-identification) and utility (TSTR,
domain FID) of teacher and student samples, written to report.json and report.html."""

from __future__ import annotations

import json
from typing import Any

import structlog

from privdistill.config import RunConfig
from privdistill.data.types import ImageSet
from privdistill.errors import StageError
from privdistill.seeds import derive_seed
from privdistill.stages import StageContext
from privdistill.workdir import FILTER, INGEST, MODEL_DIR, SAMPLE, SAMPLES_FILE, TEST_SET, TRAIN_SET, TRAIN_STUDENT

log = structlog.get_logger(__name__)


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
        if data.labels is None or test.labels is None:
            report[name][key] = None
            continue
        detail[name] = downstream_accuracy(data.images, data.labels, test.images, test.labels, n_classes, ds,
                                           seed=derive_seed(cfg.seed, "downstream", i))
        report[name][key] = detail[name]["accuracy"]
    report["downstream"] = {"model": ds.model, "label_fraction": ds.label_fraction, **detail}


def evaluate_run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.classifier import accuracy, features
    from privdistill.imaging import at_resolution
    from privdistill.measure import CACHE_DIR, MeasureCache, RealSide, copying, load_prompt_labels, measure
    from privdistill.models import DiffusionModel
    from privdistill.reid import train_reid
    from privdistill.report import write_report
    from privdistill.sample import sample_dataset
    from privdistill.workdir import KEPT_FILE

    train = ImageSet.load(ctx.input(INGEST) / TRAIN_SET)
    test = ImageSet.load(ctx.input(INGEST) / TEST_SET)
    if len(test) == 0 or test.labels is None or train.labels is None:
        raise StageError("evaluation needs a labelled real test set (data.test_source or data.test_fraction)")
    teacher_samples = ImageSet.load(ctx.input(SAMPLE) / SAMPLES_FILE)
    filter_report = json.loads((ctx.input(FILTER) / "privacy_report.json").read_text())
    student_dir = ctx.input(TRAIN_STUDENT)
    student = DiffusionModel.load(student_dir / MODEL_DIR)
    student_samples = sample_dataset(student, cfg.sample, seed=derive_seed(cfg.seed, "student-samples"), prompt_labels=load_prompt_labels(student_dir))

    # what depends on the real data only is cached in the work directory (keyed by its inputs' hashes)
    cache = MeasureCache(ctx.workdir / CACHE_DIR)
    # An independent re-identification model: other architecture, other seed than the filter's.
    seed_ind = cfg.seed + cfg.evaluate.independent_reid_seed_offset
    train_a = at_resolution(train, cfg.analysis_resolution)
    reid_key = {"train": train_a, "reid": cfg.reid.model_dump(mode="json"), "seed": seed_ind, "arch": "resnet",
                "target_tpr": cfg.evaluate.reid_target_tpr}
    reid = cache.reid(reid_key, lambda: train_reid(train_a, cfg.reid, seed=seed_ind, arch="resnet",
                                                   target_tpr=cfg.evaluate.reid_target_tpr))
    train_emb = cache.array("reid-train-embeddings", reid_key, lambda: reid.embed(train_a.images))
    real_clf = cache.classifier(train.images, train.labels, len(train.class_names), steps=cfg.evaluate.classifier_steps,
                                batch_size=cfg.evaluate.classifier_batch_size, seed=derive_seed(cfg.seed, "eval-classifier"))
    real = RealSide(test=test, feature_clf=real_clf, fid_features=features(real_clf, test.images), train=train_a,
                    reid_embed=reid.embed, train_emb=train_emb, reid_threshold=reid.threshold,
                    memorization_in_reid_space=True, fresh=test.images)
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
            **copying(ImageSet.load(ctx.input(FILTER) / KEPT_FILE).images, train, test.images, None, prefix="kept_"),
        },
        **({"teacher_dp": filter_report["teacher_dp"]} if "teacher_dp" in filter_report else {}),
        "independent_reid": {"arch": "resnet", "seed": seed_ind, "threshold": reid.threshold, "calibration": reid.calibration},
    }

    def measured(samples: ImageSet, seed: int) -> dict[str, Any]:
        return measure(samples, real, cfg.evaluate, analysis_resolution=cfg.analysis_resolution, seed=seed)

    # the teacher's samples do not change when only the student does: their numbers are cached too
    report["teacher"] = cache.json(
        "teacher-measure", {"samples": teacher_samples, "real": real.key(), "ev": cfg.evaluate.model_dump(mode="json"),
                            "analysis_resolution": cfg.analysis_resolution, "seed": derive_seed(cfg.seed, "measure-teacher")},
        lambda: measured(teacher_samples, derive_seed(cfg.seed, "measure-teacher")))
    report["student"] = measured(student_samples, derive_seed(cfg.seed, "measure-student"))
    for name in ("teacher", "student"):
        log.info("evaluate.result", model=name, memorization_rate=report[name]["memorization_rate"],
                 reid_rate=report[name]["reid_rate"], tstr_accuracy=report[name]["tstr_accuracy"])
    _downstream(report, train, test, {"teacher": teacher_samples, "student": student_samples}, cfg)
    # membership inference: the teacher's AUC was measured at the sample stage; the student's here, on the
    # same real members (the teacher's training split) and held-out non-members. Headline: student vs teacher.
    from privdistill.audit.mia import run_membership_audit

    teacher_mia = (filter_report.get("mia") or {}).get("teacher") or {}
    student_mia = run_membership_audit(student, ctx.input(INGEST), cfg.data, seed=cfg.seed)
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
