"""The evaluation report: report.json plus one self-contained HTML page (no external assets)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from markupsafe import Markup

from privdistill import __version__
from privdistill.imaging import grid, png_data_uri
from privdistill.web.render import PAGES_CSS, environment, flatten

log = structlog.get_logger(__name__)

MODELS = ("teacher", "student", "real")
HEADLINE = {
    "memorization_rate": "Memorization rate",
    "reid_rate": "Re-identification rate",
    "mia_auc": "Membership-inference AUC",
    "tstr_accuracy": "Downstream accuracy (TSTR; real: TRTR)",
    "fid_domain": "Domain FID",
}
OPTIONAL = {  # headline rows shown only when the report has them
    "tstr_vit": "Downstream accuracy, ViT, few labels (TSTR; real: TRTR)",
    "tstr_semi_vit": "Downstream accuracy, Semi-ViT, few labels (TSTR; real: TRTR)",
}
EXPLAIN = {
    "Memorization rate": "Share of generated images that are near-copies of a training image: closer "
    "to their nearest training image than a third of their distance to any other patient's images "
    "(pixel space, sampler noise removed, 1-pixel shifts allowed, the training image also compared blurred "
    "by 0.5/0.7/1 px; in the evaluation also in the independent re-identification model's feature space). "
    "memorization_ci is its 95% Wilson interval, memorization_undecidable the samples the test could not "
    "decide (counted as memorized in the interval's upper end, never as safe). Lower is better.",
    "Data-copying AUC": "How much closer generated images sit to their nearest training image than fresh real "
    "images of unseen patients do (ROC AUC of the two nearest-neighbour distances, Meehan et al. 2020 style), "
    "with a 95% bootstrap interval: 0.5 means no copying, 1.0 every sample closer than every fresh image. "
    "Reported for the teacher's samples, the filter's kept samples and the student's samples.",
    "Re-identification rate": "Share of generated images that an independently trained "
    "re-identification model links to a real training patient. Lower is better.",
    "Downstream accuracy": "A classifier trained on the generated images (TSTR), tested on real "
    "held-out images; the real column trains on real images (TRTR) as the reference. Higher is better.",
    "Downstream accuracy, ViT / Semi-ViT": "Only when evaluate.downstream.model is vit or semi_vit: a small "
    "Vision Transformer given the labels of only a label_fraction of the training images (per class); Semi-ViT "
    "also learns from the rest, unlabelled, through an EMA teacher's confident pseudo-labels and pseudo-mixup "
    "(Cai et al. 2022, without self-supervised pre-training). Tested on real held-out images. Higher is better.",
    "Domain FID": "Fréchet distance between real test and generated images in the feature space of a "
    "classifier trained on real data. Lower is better. Not comparable with published (Inception) FIDs.",
    "Membership-inference AUC": "ROC AUC of a loss attack telling the teacher's real training patients from "
    "held-out real patients (minus the mean denoising loss at fixed noise levels and fixed noise, class-balanced, "
    "averaged over each patient's images): 0.5 means no membership leak, 1.0 a model that gives every training "
    "patient away. mia_auc_ci95 is its patient-level bootstrap 95% interval and mia_n_patients the member / "
    "non-member patients it rests on: an AUC whose interval contains 0.5 shows no leak was detected, not that "
    "there is none. The student's AUC against the teacher's is the headline of privacy distillation.",
    "Intervals": "memorization_ci is a Wilson 95% interval over memorization_n generated images with the "
    "undecidable ones counted as memorized; reid_ci95 is an exact (Clopper-Pearson) interval over n_privacy_samples: "
    "0 of 180 means a rate below about 2%, not 0.",
    "non_dp_aggregates": "Every number here except teacher_dp was computed on real patients without "
    "differential privacy; the teacher's epsilon does not cover them.",
    "Filter audit": "fresh_drop_rate (with fresh_drop_ci, a Clopper-Pearson 95% interval, and fresh_n): the "
    "share of fresh real images of new patients, kept apart from the calibration, that the filter drops (it is "
    "calibrated to at most alpha). recall: per kind of copy of a training image the filter was not built around "
    "(blur, correlated noise, a homogeneous class, local marks, held-out repeat visits, the teacher's own "
    "near-copies, and exact / shifted / noisy / contrast copies), the share it drops with n and a patient-level "
    "bootstrap 95% interval; too_few lists kinds with too few cases to say much.",
    "Filter": "The filter drops a generated image when its re-identification, pixel or local-patch score against "
    "the training images passes a threshold calibrated on held-out patients (calibration.alpha, split between "
    "the detectors; calibration.n_null images). reid_pairs: the re-identification model's TPR/FPR on distinct "
    "held-out same- and different-patient pairs (a diagnostic; the filter does not use it).",
    "teacher_dp": "Only when the teacher was trained with DP-SGD: the (epsilon, delta) its RDP accountant "
    "spent (Poisson-sampled patients, per-patient clipping; a semantic query for public pretraining is "
    "composed in). It bounds what the teacher and its unfiltered samples reveal about any one patient; "
    "the filter looks at real images and is not covered by it.",
}
def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _headline(report: dict) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    """The models present and one (label, value per model) row per headline metric, then any other metric."""
    models = [m for m in MODELS if isinstance(report.get(m), dict)]
    keys = {k for m in models for k in report[m]}
    keys |= {"tstr_" + k[5:] for k in keys if k.startswith("trtr_")}  # real's TRTR shares the row of its TSTR
    extra = sorted((k for k in keys if k not in HEADLINE and not k.startswith("trtr_")), key=str)
    rows = []
    for key in list(HEADLINE) + extra:
        cells = []
        for m in models:
            v = report[m].get(key)
            if key.startswith("tstr_") and v is None:
                v = report[m].get("trtr_" + key[5:])
            cells.append(v)
        rows.append((HEADLINE.get(key) or OPTIONAL.get(key) or str(key), cells))
    return models, rows


def _png_data_uri(images: np.ndarray) -> str:
    buf = io.BytesIO()
    grid(images[:64], ncols=8, scale=2).save(buf, format="PNG")
    return png_data_uri(buf.getvalue())


def render_html(report: dict, grids: dict[str, np.ndarray]) -> str:
    """The report page as one HTML string (templates/report.html with the pages' stylesheet inline)."""
    models, headline = _headline(report)
    flt = report.get("filter")
    sections = []
    for key in sorted((k for k in report if k not in (*MODELS, "filter", "name")), key=str):
        value = report[key]
        sections.append((str(key), flatten(value) if isinstance(value, dict) else [(key, value)]))
    return environment().get_template("report.html").render(
        title=str(report.get("name", "privdistill evaluation report")), css=Markup(PAGES_CSS.read_text()),
        models=models, headline=headline, filter_rows=flatten(flt) if isinstance(flt, dict) else [],
        explain=EXPLAIN, grids=[(name, _png_data_uri(images)) for name, images in grids.items()],
        sections=sections, version=__version__)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(report: dict, out_dir: Path, *, grids: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """Write ``report.json`` (pretty, sorted keys) and a self-contained ``report.html`` into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    _atomic_write(json_path, json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n")
    _atomic_write(html_path, render_html(report, grids))
    log.info("report.written", files=[json_path.name, html_path.name], grids=len(grids))
    return json_path, html_path
