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
from privdistill.audit.tprime import model_tprime
from privdistill.config import RunConfig
from privdistill.data.types import ImageSet
from privdistill.errors import PrivacyPolicyError
from privdistill.filter import FilterResult, filter_synthetic

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
    dp = cfg.privacy.dp if cfg.privacy is not None else None
    if dp is not None:  # audit the teacher the run would train: DP-SGD when the config asks for it
        from privdistill.dp import train_teacher_dp

        report = train_teacher_dp(model, data, tcfg, dp, seed=cfg.seed, resolution=cfg.data.resolution,
                                  channels=cfg.data.channels)
    else:
        report = train_diffusion(model, data, tcfg, seed=cfg.seed)
    return model, {k: v for k, v in report.items() if k != "loss_curve"}


def _free_samples(model: Any, cfg: RunConfig, data: ImageSet, n: int) -> ImageSet:
    from privdistill.sample import prompt_label_map, sample_dataset

    groups = len(model.class_names) if model.conditioning == "class" else len(set(data.prompts or [])) or 1
    scfg = cfg.sample.model_copy(update={"per_class": max(1, math.ceil(n / groups))})
    return sample_dataset(model, scfg, seed=cfg.seed + 2, prompt_labels=prompt_label_map(data) or None)


def run_fingerprint_audit(
    cfg: RunConfig, workdir: Path, *, fingerprints: int, out_dir: Path | None = None, steps: int | None = None,
    n_samples: int = 200, seeds: int = 4, detector_steps: int = 400,
) -> dict[str, Any]:
    """Run the audit and write ``report.json``, ``report.md`` and a local review grid into ``out_dir``
    (default WORKDIR/audit). Raises PrivacyPolicyError (exit 4) AFTER writing the report when a
    fingerprinted free sample survived the filter."""
    from privdistill.audit.report import write_audit_report
    from privdistill.pipeline import run_pipeline
    from privdistill.reid import OnnxEmbedder, load_reid

    workdir = Path(workdir)
    out_dir = Path(out_dir) if out_dir is not None else workdir / "audit"
    run_pipeline(cfg, workdir, stages=["ingest", "train-reid"])  # the run's own split and filter model
    train = ImageSet.load(workdir / "ingest" / "train.npz")
    test = ImageSet.load(workdir / "ingest" / "test.npz")

    planted = plant(train, fingerprints, seed=cfg.seed)
    fps, idx = planted.fingerprints, planted.indices
    clean_idx = np.setdiff1d(np.arange(len(train)), idx)
    model, teacher_report = _teacher(cfg, planted.data, steps)

    detector = train_detector(train.images[clean_idx], fps, steps=detector_steps, seed=cfg.seed)
    held = test.images[:MAX_DETECTOR_HELDOUT] if len(test) else train.images[clean_idx][:MAX_DETECTOR_HELDOUT]
    det_acc = detector_accuracy(detector, held, fps, seed=cfg.seed)

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
    tc = model_tprime(model, ctrl, detector.detect, grid=tp["grid"], seeds=seeds, full_steps=cfg.sample.steps) \
        if len(ctrl) else None

    samples = _free_samples(model, cfg, planted.data, n_samples)
    carrier = detector.detect(samples.images)
    nearest, dist = map_to_fingerprinted(samples.images, planted.images)

    reid = load_reid(workdir / "train-reid" / "reid")
    embed = OnnxEmbedder(workdir / "train-reid" / "reid.onnx").embed
    active = cfg.filter.model_copy(update={"enabled": True})
    result = filter_synthetic(samples, planted.data, embed=embed, threshold=reid.threshold, cfg=active)
    kept_carriers = survivors(carrier, result)
    dropped = set(result.dropped.tolist())
    exact = filter_synthetic(fp_set, planted.data, embed=embed, threshold=reid.threshold, cfg=active)

    per_fp = []
    for j, (fp, i) in enumerate(zip(fps, idx)):
        mine = carrier & (nearest == j)
        per_fp.append({
            "fingerprint": j, **fp.to_dict(), "training_index": int(i),
            "patient_id": None if train.patient_ids is None else str(train.patient_ids[i]),
            "label": None if train.labels is None else train.class_names[int(train.labels[i])],
            "t_prime": tp["t_prime"][j], "t_prime_fraction": tp["t_prime_fraction"][j],
            "returned_by_level": dict(zip(map(str, tp["grid"]), tp["returned"][j])),
            "control_t_prime": None if tc is None or j >= len(tc["t_prime"]) else tc["t_prime"][j],
            "free_samples_carrying": int(mine.sum()),
        })
    n_carry = int(carrier.sum())
    report: dict[str, Any] = {
        "name": cfg.name,
        "fingerprints": per_fp,
        "settings": {"k": fingerprints, "teacher_steps": teacher_report.get("steps"), "noise_seeds": seeds,
                     "grid": tp["grid"], "num_train_timesteps": tp["num_train_timesteps"], "n_samples": len(samples),
                     "ddim_steps": cfg.sample.steps, "detector_steps": detector_steps, "seed": cfg.seed},
        "teacher": teacher_report,
        "detector": {"heldout": det_acc, "false_positive_rate_note": "held-out real images without a fingerprint"},
        "t_prime": {
            "median": float(np.median(tp["t_prime"])), "max": int(max(tp["t_prime"])),
            "median_fraction": float(np.median(tp["t_prime_fraction"])),
            "control_median": None if tc is None else float(np.median(tc["t_prime"])),
        },
        "free_samples": {
            "n": len(samples), "carrying_fingerprint": n_carry, "fraction": n_carry / max(1, len(samples)),
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
    }
    report["failures"] = audit_failures(report)
    report["passed"] = not report["failures"]
    write_audit_report(report, out_dir, samples=samples.images[carrier], matched=planted.images[nearest[carrier]],
                       fingerprinted=planted.images)
    log.info("fingerprint_audit.done", k=fingerprints, median_t_prime=report["t_prime"]["median"],
             carriers=n_carry, survivors=len(kept_carriers))
    raise_if_survivors(report, out_dir)
    return report


MIN_DETECTOR_TPR = 0.9


def audit_failures(report: dict[str, Any]) -> list[str]:
    """Every reason the audit does not pass: a fingerprinted sample or an exact fingerprinted copy kept by the
    filter, or a detector too weak for "no carrier found" to mean anything."""
    flt, det = report["filter"], report["detector"]["heldout"]
    failures = []
    if flt["survivors"]:
        failures.append(f"{len(flt['survivors'])} of {flt['fingerprinted_samples']} fingerprinted free samples "
                        f"survived the filter (samples {flt['survivors']})")
    if flt["exact_copies_recall"] < 1.0:
        failures.append(f"the filter kept exact copies of fingerprinted training images (recall "
                        f"{flt['exact_copies_recall']:.3f})")
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
