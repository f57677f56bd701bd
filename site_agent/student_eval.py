"""A site checks a released student against its own patients: memorization and re-identification
rates against this site's training data and TSTR accuracy on its local test set (all local)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from privdistill.data.types import ImageSet
from privdistill.errors import DataError, StageError
from privdistill.seeds import derive_seed
from privdistill.stages import atomic_write_json, hash_tree, read_record
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


def _prompt_labels(model_dir: Path, model_path: Path) -> dict[str, int | None] | None:
    for p in (model_path / "prompts.json", model_dir / "prompts.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def _align_labels(samples: ImageSet, test: ImageSet) -> tuple[ImageSet, ImageSet] | None:
    """Map the student's class names onto this site's; keep only classes both know."""
    if samples.labels is None or test.labels is None:
        return None
    site_index = {name: i for i, name in enumerate(test.class_names)}
    mapped = np.array([site_index.get(samples.class_names[lab], -1) for lab in samples.labels], np.int64)
    known = {int(x) for x in mapped if x >= 0}
    s_keep = np.flatnonzero(mapped >= 0)
    t_keep = np.flatnonzero(np.isin(test.labels, sorted(known)))
    if len(s_keep) == 0 or len(t_keep) == 0:
        return None
    syn = ImageSet(images=samples.images[s_keep], labels=mapped[s_keep], class_names=list(test.class_names))
    return syn, test.subset(t_keep)


def evaluate_student(cfg: SiteConfig, workdir: Path, model_dir: Path) -> dict[str, Any]:
    """Sample the student with the config's sample settings and measure it on this site's data;
    writes WORKDIR/student-eval/report.json (aggregates only) and returns it."""
    from privdistill.metrics import memorization, reid_rate, tstr_accuracy
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
    samples = sample_dataset(model, cfg.sample, seed=derive_seed(cfg.seed, "released-student-samples"), prompt_labels=_prompt_labels(model_dir, model_path))
    teacher_samples = ImageSet.load(workdir / "sample" / "samples.npz") if read_record(workdir, "sample") else None
    train = ImageSet.load(workdir / "ingest" / "train.npz")
    test = ImageSet.load(workdir / "ingest" / "test.npz")
    from privdistill.imaging import at_resolution

    train_a = at_resolution(train, cfg.analysis_resolution)  # privacy checks at the analysis resolution
    reid_meta = json.loads((workdir / "train-reid" / "reid" / "reid.json").read_text())
    embedder = OnnxEmbedder(workdir / "train-reid" / "reid.onnx")
    threshold = float(reid_meta["threshold"])
    train_emb = embedder.embed(train_a.images)

    from privdistill.audit.mia import comparable_nonmembers, ingest_visits, membership_auc

    nonmembers = comparable_nonmembers(test, ingest_visits(cfg.data, workdir / "ingest"), seed=cfg.seed)

    def mia(m: DiffusionModel) -> dict[str, Any]:
        """Membership inference against this site's training patients (members) vs its held-out ones."""
        return membership_auc(m, train, nonmembers, seed=cfg.seed) if len(test) else {"auc": None}

    def _memorization(m: dict[str, Any]) -> dict[str, Any]:
        # undecidable samples are reported, and the release gate counts them as memorized
        return {"memorization_rate": m["rate"], "memorization_undecidable": m["undecidable"], "memorization_ci": m["ci"]}

    def measure(synthetic: ImageSet, seed: int) -> dict[str, Any]:
        tstr, aligned = None, _align_labels(synthetic, test)
        if aligned is not None:
            syn, local_test = aligned
            tstr = tstr_accuracy(syn, local_test, len(test.class_names), steps=cfg.evaluate.classifier_steps,
                                 batch_size=cfg.evaluate.classifier_batch_size, seed=seed)
        return {
            "n_samples": len(synthetic),
            **_memorization(memorization(at_resolution(synthetic, cfg.analysis_resolution).images, train_a,
                                         ratio=cfg.evaluate.memorization_ratio)),
            "reid_rate": reid_rate(synthetic.images, train_emb, embed=embedder.embed, threshold=threshold),
            "tstr_accuracy": tstr,
            "tstr_classes": None if aligned is None else sorted({test.class_names[int(i)] for i in aligned[1].labels}),
        }

    student_mia = mia(model)
    teacher_dir = workdir / "train-teacher" / "model"
    teacher_mia = mia(DiffusionModel.load(teacher_dir)) if read_record(workdir, "train-teacher") else None
    report = {
        "model_sha256": hash_tree(model_path),
        "site_id": cfg.site.id,
        "memorization_ratio": cfg.evaluate.memorization_ratio,
        "reid_threshold": threshold,
        "n_train": len(train),
        "n_test": len(test),
        "student": measure(samples, derive_seed(cfg.seed, "measure-student")),
        # the same measurements of this site's own teacher samples, for comparison (both stay local)
        "teacher": None if teacher_samples is None else measure(teacher_samples, derive_seed(cfg.seed, "measure-teacher")),
    }
    report["student"]["mia_auc"] = student_mia.get("auc")
    if report["teacher"] is not None and teacher_mia is not None:
        report["teacher"]["mia_auc"] = teacher_mia.get("auc")
    report["membership_inference"] = {"student": student_mia, "teacher": teacher_mia}
    atomic_write_json(workdir / REPORT_DIR / "report.json", report)
    _attest(cfg, workdir, model_path, report["student"], student_mia)
    log.info("student_eval.done", memorization_rate=report["student"]["memorization_rate"],
             reid_rate=report["student"]["reid_rate"], tstr_accuracy=report["student"]["tstr_accuracy"])
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
