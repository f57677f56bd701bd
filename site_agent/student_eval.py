"""A site checks a released student against its own patients: memorization and re-identification
rates against this site's training data and TSTR accuracy on its local test set (all local)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from privdistill.data.types import ImageSet
from privdistill.errors import DataError, StageError
from privdistill.measure import MeasureCache
from privdistill.seeds import derive_seed
from privdistill.stages import atomic_write_json, hash_tree, read_record
from privdistill.workdir import INGEST, WorkDir
from site_agent.config import SiteConfig

log = structlog.get_logger(__name__)

REPORT_DIR = "student-eval"


def _model_path(model_dir: Path) -> Path:
    from privdistill.models import META_FILE

    for cand in (model_dir, model_dir / "model"):
        if (cand / META_FILE).is_file():
            return cand
    raise StageError(f"no privdistill student model in {model_dir} (expected {META_FILE} there or in model/); "
                     "point evaluate-student at the released model folder")


def _teacher_mia(cfg: SiteConfig, workdir: Path, cache: MeasureCache, train: ImageSet,
                 nonmembers: ImageSet) -> dict[str, Any] | None:
    """This site's teacher's membership AUC: the sample stage measured it on the same members and non-members
    with the same seed (reused when that stage ran on the current teacher), else computed once and cached."""
    from privdistill.audit.mia import membership_auc
    from privdistill.models import DiffusionModel

    teacher_rec = read_record(workdir, "train-teacher")
    if teacher_rec is None:
        return None
    sample_rec = read_record(workdir, "sample")
    mia_file = WorkDir(workdir).teacher_mia
    if (sample_rec is not None and mia_file.is_file()
            and (sample_rec.get("inputs") or {}).get("train-teacher") == teacher_rec.get("outputs_hash")):
        return json.loads(mia_file.read_text())
    teacher_dir = WorkDir(workdir).teacher_model
    return cache.json("teacher-mia", {"model": teacher_rec.get("outputs_hash"), "members": train,
                                      "nonmembers": nonmembers, "seed": cfg.seed},
                      lambda: membership_auc(DiffusionModel.load(teacher_dir), train, nonmembers, seed=cfg.seed))


def evaluate_student(cfg: SiteConfig, workdir: Path, model_dir: Path) -> dict[str, Any]:
    """Sample the student with the config's sample settings and measure it on this site's data;
    writes WORKDIR/student-eval/report.json (aggregates only) and returns it. What depends on this site's data
    only (the real-data feature classifier, the re-id embeddings of the training set, the teacher's numbers)
    is cached in WORKDIR/.measure-cache, keyed by the hashes of its inputs."""
    from privdistill.audit.mia import comparable_nonmembers, ingest_visits, membership_auc
    from privdistill.classifier import features
    from privdistill.imaging import at_resolution
    from privdistill.measure import CACHE_DIR, RealSide, load_prompt_labels, measure
    from privdistill.models import DiffusionModel
    from privdistill.reid import OnnxEmbedder
    from privdistill.sample import sample_dataset

    workdir, model_dir = Path(workdir), Path(model_dir)
    for stage in ("ingest", "train-reid"):
        if read_record(workdir, stage) is None:
            raise StageError(f"evaluate-student needs this site's {stage} stage; run `privdistill-site run` first")
    model_path = _model_path(model_dir)
    model = DiffusionModel.load(model_path)
    if (model.resolution, model.channels) != (cfg.data.resolution, cfg.data.channels):
        raise DataError(f"the student makes {model.channels}x{model.resolution}px images and this site's data is "
                        f"{cfg.data.channels}x{cfg.data.resolution}px: it was not trained for this site's data")
    samples = sample_dataset(model, cfg.sample, seed=derive_seed(cfg.seed, "released-student-samples"),
                             prompt_labels=load_prompt_labels(model_path, model_dir))
    teacher_samples = ImageSet.load(WorkDir(workdir).samples) if read_record(workdir, "sample") else None
    train = ImageSet.load(WorkDir(workdir).train_set)
    test = ImageSet.load(WorkDir(workdir).test_set)

    cache = MeasureCache(workdir / CACHE_DIR)
    train_a = at_resolution(train, cfg.analysis_resolution)  # privacy checks at the analysis resolution
    reid_meta = json.loads((WorkDir(workdir).reid_model / "reid.json").read_text())
    reid_onnx = WorkDir(workdir).reid_onnx
    embedder = OnnxEmbedder(reid_onnx)
    threshold = float(reid_meta["threshold"])
    train_emb = cache.array("reid-train-embeddings", {"onnx": reid_onnx, "train": train_a},
                            lambda: embedder.embed(train_a.images))
    real = RealSide(test=test if len(test) else None, train=train_a, reid_embed=embedder.embed,
                    train_emb=train_emb, reid_threshold=threshold)
    if len(test) and train.labels is not None and test.labels is not None:
        real.feature_clf = cache.classifier(train.images, train.labels, len(train.class_names),
                                            steps=cfg.evaluate.classifier_steps,
                                            batch_size=cfg.evaluate.classifier_batch_size, seed=derive_seed(cfg.seed, "eval-classifier"))
        real.fid_features = features(real.feature_clf, test.images)

    def measured(synthetic: ImageSet, stream: str) -> dict[str, Any]:
        return measure(synthetic, real, cfg.evaluate, analysis_resolution=cfg.analysis_resolution,
                       seed=derive_seed(cfg.seed, stream))

    # membership inference against this site's training patients (members) vs its held-out ones
    nonmembers = comparable_nonmembers(test, ingest_visits(cfg.data, WorkDir(workdir).stage(INGEST)), seed=cfg.seed)
    student_mia = membership_auc(model, train, nonmembers, seed=cfg.seed) if len(test) else {"auc": None}
    teacher_mia = _teacher_mia(cfg, workdir, cache, train, nonmembers) if len(test) else None
    report: dict[str, Any] = {
        "model_sha256": hash_tree(model_path),
        "site_id": cfg.site.id,
        "memorization_ratio": cfg.evaluate.memorization_ratio,
        "reid_threshold": threshold,
        "n_train": len(train),
        "n_test": len(test),
        "student": measured(samples, "measure-student"),
        # the same measurements of this site's own teacher samples, for comparison (both stay local)
        "teacher": None if teacher_samples is None else cache.json(
            "teacher-measure", {"samples": teacher_samples, "real": real.key(), "analysis": cfg.analysis_resolution,
                                "ev": cfg.evaluate.model_dump(mode="json"), "seed": derive_seed(cfg.seed, "measure-teacher")},
            lambda: measured(teacher_samples, "measure-teacher")),
    }
    report["student"]["mia_auc"] = student_mia.get("auc")
    if report["teacher"] is not None and teacher_mia is not None:
        report["teacher"]["mia_auc"] = teacher_mia.get("auc")
    report["membership_inference"] = {"student": student_mia, "teacher": teacher_mia}
    atomic_write_json(workdir / REPORT_DIR / "report.json", report)
    _attest(cfg, workdir, model_path, report["student"], student_mia)
    log.info("student_eval.done", memorization_rate=report["student"]["memorization_rate"],
             reid_rate=report["student"]["reid_rate"], tstr_accuracy=report["student"]["tstr_accuracy"],
             cache_hits=sorted(cache.hits))
    return report


def _attest(cfg: SiteConfig, workdir: Path, model_path: Path, student: dict[str, Any], mia: dict[str, Any]) -> None:
    """student-eval/attestation.json + .sig: the aggregate numbers, signed with this site's key, that the
    coordinator's release policy may require (nothing per image, nothing that names a patient)."""
    from privdistill.audit.attestation import ATTESTATION, ATTESTATION_SIG, make_attestation
    from privdistill.identity import load_private_key
    from privdistill.stages import atomic_write_text

    if not cfg.site.key_file.is_file():  # only a non-production site gets this far without a key
        log.warning("student_eval.not_attested", reason="site.key_file missing: no signed attestation written")
        return
    numbers = {**student, **{f"mia_{k}": mia.get(k) for k in ("n_members", "n_nonmembers", "auc_ci95", "unit",
                                                                "n_member_units", "n_nonmember_units", "tpr_at_fpr")}}
    data, sig = make_attestation(cfg.site.id, model_path, numbers, load_private_key(cfg.site.key_file))
    atomic_write_text(workdir / REPORT_DIR / ATTESTATION, data.decode())
    atomic_write_text(workdir / REPORT_DIR / ATTESTATION_SIG, sig + "\n")
