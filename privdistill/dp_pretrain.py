"""PrivImage-style start for the DP teacher: a noisy semantic query picks public classes to pretrain on,
or the weights of a local non-sensitive model (``init_from``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from privdistill.config import DataConfig, DPConfig, PublicPretrainingConfig, TrainConfig
from privdistill.data.types import ImageSet
from privdistill.errors import DataError, StageError
from privdistill.models import DiffusionModel
from privdistill.seeds import derive_seed

log = structlog.get_logger(__name__)
QUERY_FILE = "semantic_query.json"
PRETRAINED_DIR = "pretrained"


def load_public(pp: PublicPretrainingConfig, *, resolution: int, channels: int, seed: int) -> ImageSet:
    """The public labelled set, preprocessed like the sensitive data (a 1% patient split is set aside)."""
    from privdistill.data.load import load_dataset

    cfg = DataConfig(source=pp.source, resolution=resolution, channels=channels, max_per_class=pp.max_per_class,
                     test_fraction=0.01)
    public = load_dataset(cfg, seed=seed).train
    if public.labels is None:
        raise DataError("privacy.dp.public_pretraining.source has no labels; the semantic query needs public classes")
    return public


def unit_votes(probs: np.ndarray, labels: np.ndarray, units: list[np.ndarray], n_classes: int, k: int) -> np.ndarray:
    """Counts [sensitive class, public class]: each privacy unit adds 1 to the top-k public classes of its
    mean public-class probabilities, in the row of its majority sensitive class. Adding or removing one
    unit changes k counts by 1, so the L2 sensitivity is sqrt(k)."""
    counts = np.zeros((n_classes, probs.shape[1]), dtype=np.float64)
    for idx in units:
        row = int(np.bincount(labels[idx], minlength=n_classes).argmax())
        mine = idx[labels[idx] == row]
        top = np.argsort(-probs[mine].mean(0), kind="stable")[:k]
        counts[row, top] += 1
    return counts


def semantic_query(
    sensitive: ImageSet, units: list[np.ndarray], public: ImageSet, pp: PublicPretrainingConfig, *, seed: int,
    secret: torch.Generator,
) -> dict[str, Any]:
    """Gaussian-noised per-class histogram of public labels; the selected public classes and the RDP
    history entry of this Gaussian mechanism (noise multiplier query_sigma / sqrt(k), q = 1, one step)."""
    from privdistill.classifier import train_classifier
    from privdistill.dp import gaussian_query_entry

    if sensitive.labels is None or public.labels is None:
        raise StageError("the semantic query needs class labels on the sensitive and on the public images")
    n_public = len(public.class_names)
    k = min(pp.classes_k, n_public)
    clf = train_classifier(public.images, public.labels, n_public, steps=pp.classifier_steps, batch_size=128,
                           seed=seed)
    with torch.no_grad():
        logits = torch.cat([clf.model(torch.from_numpy(sensitive.images[s:s + 512]))
                            for s in range(0, len(sensitive), 512)])
    counts = unit_votes(logits.softmax(1).numpy(), sensitive.labels, units, len(sensitive.class_names), k)
    noisy = counts + pp.query_sigma * torch.randn(counts.shape, generator=secret, dtype=torch.float64).numpy()
    del counts  # only the noisy histogram is a DP output
    n_sel = min(pp.n_classes_selected, n_public)
    selected = {c: [int(j) for j in np.argsort(-noisy[c], kind="stable")[:n_sel]] for c in range(len(noisy))}
    sensitivity = math.sqrt(k)
    return {
        "classes_k": k,
        "query_sigma": pp.query_sigma,
        "l2_sensitivity": sensitivity,
        "history_entry": list(gaussian_query_entry(pp.query_sigma, sensitivity)),
        "noisy_counts": noisy.round(3).tolist(),
        "selected": {sensitive.class_names[c]: [public.class_names[j] for j in js] for c, js in selected.items()},
        "selected_idx": {str(c): js for c, js in selected.items()},
    }


def public_subset(public: ImageSet, selected_idx: dict[str, list[int]], class_names: list[str]) -> ImageSet:
    """Public images of each sensitive class's selected public classes, labelled with that sensitive class."""
    if public.labels is None:
        raise StageError("public pretraining needs class labels on the public images")
    parts, labels = [], []
    for c, js in selected_idx.items():
        idx = np.flatnonzero(np.isin(public.labels, js))
        parts.append(public.images[idx])
        labels.append(np.full(len(idx), int(c), dtype=np.int64))
    images = np.concatenate(parts) if parts else public.images[:0]
    if len(images) == 0:
        raise StageError("the semantic query selected public classes with no images")
    return ImageSet(images=images, labels=np.concatenate(labels), class_names=list(class_names))


def _load_weights(model: DiffusionModel, path: Path) -> None:
    src = DiffusionModel.load(path)
    if src.conditioning != model.conditioning or src.class_names != model.class_names:
        raise StageError(f"{path}: conditioning/classes {src.conditioning}/{src.class_names} do not match the "
                         f"teacher's {model.conditioning}/{model.class_names}")
    try:
        model.unet.load_state_dict(src.unet.state_dict())
    except RuntimeError as err:
        raise StageError(f"{path}: its UNet does not match teacher.model ({str(err)[:200]})") from None


def prepare_start(
    model: DiffusionModel, sensitive: ImageSet, units: list[np.ndarray], dp: DPConfig, train: TrainConfig, *,
    resolution: int, channels: int, seed: int, checkpoint_dir: Path | None, secret: torch.Generator,
) -> tuple[list[tuple[float, float, int]], dict[str, Any] | None]:
    """Initialise ``model`` before DP training; return the RDP history already spent and a report.

    The query's noisy answer is saved in ``checkpoint_dir`` and reused after a kill: asking again with
    fresh noise would spend the budget twice."""
    from privdistill.train import Trainer

    if dp.init_from is not None:
        _load_weights(model, dp.init_from)
        return [], {"init_from": str(dp.init_from)}
    pp = dp.public_pretraining
    if pp is None:
        return [], None
    qfile = None if checkpoint_dir is None else checkpoint_dir / QUERY_FILE
    public: ImageSet | None = None
    if qfile is not None and qfile.is_file():
        query = json.loads(qfile.read_text())
        log.info("dp.semantic_query_reused")
    else:
        public = load_public(pp, resolution=resolution, channels=channels, seed=seed)
        query = semantic_query(sensitive, units, public, pp, seed=seed, secret=secret)
        if qfile is not None:
            qfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = qfile.with_suffix(".tmp")
            tmp.write_text(json.dumps(query))
            tmp.replace(qfile)
    pre_dir = None if checkpoint_dir is None else checkpoint_dir / PRETRAINED_DIR
    if pre_dir is not None and pre_dir.is_dir():
        _load_weights(model, pre_dir)
    else:
        if public is None:
            public = load_public(pp, resolution=resolution, channels=channels, seed=seed)
        subset = public_subset(public, query["selected_idx"], sensitive.class_names)
        pre_cfg = train.model_copy(update={"steps": pp.steps, "checkpoint_every": pp.steps})
        pre_report = Trainer(model, subset, pre_cfg, seed=derive_seed(seed, "dp-public-pretrain")).fit()
        log.info("dp.pretrained", steps=pre_report["steps"], n_public=len(subset), loss=pre_report["final_loss"])
        if pre_dir is not None:
            tmp_dir = pre_dir.with_name(PRETRAINED_DIR + ".tmp")
            model.save(tmp_dir)
            tmp_dir.replace(pre_dir)
    noise, rate, steps = query["history_entry"]
    entry = (float(noise), float(rate), int(steps))
    report = {k: query[k] for k in ("classes_k", "query_sigma", "l2_sensitivity", "selected", "noisy_counts")}
    report["pretrain_steps"] = pp.steps
    return [entry], {"public_pretraining": report}
