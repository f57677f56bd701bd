"""One measurement of synthetic images against real (or reference) images, used by the pipeline's evaluate
stage, the site's ``evaluate-student`` and the coordinator's student check: privacy (memorization, data
copying, re-identification) and utility (TSTR, domain FID), each computed only where its inputs are given.

What depends only on the real side (the feature classifier trained on real images, the re-identification
embeddings of the training set, an independent re-identification model, the measurements of the site's own
teacher) is cached by ``MeasureCache`` in the work directory, keyed by the sha256 of its inputs (data, config,
seed, software version), so a second evaluation of a new student reuses it instead of retraining. The cache
holds real-data models and features: it lives in the site's work directory and nothing exports it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog

from privdistill.data.types import ImageSet
from privdistill.workdir import PROMPTS_FILE

if TYPE_CHECKING:
    from privdistill.classifier import Classifier
    from privdistill.reid import ReidModel

log = structlog.get_logger(__name__)

CACHE_DIR = ".measure-cache"  # under a work directory; real-data derived, never packaged or exported


class Settings(Protocol):
    """The evaluation settings a measurement reads (the pipeline's evaluate section, the coordinator's
    evaluation section)."""

    @property
    def classifier_steps(self) -> int: ...

    @property
    def classifier_batch_size(self) -> int: ...

    @property
    def memorization_ratio(self) -> float: ...


# ----------------------------------------------------------------------------- inputs read once
def load_prompt_labels(*dirs: Path) -> dict[str, int | None] | None:
    """The prompt -> class map (``prompts.json``) of a text-conditional model: the first of ``dirs`` that has
    one; None for a class-conditional model."""
    for d in dirs:
        p = Path(d) / PROMPTS_FILE
        if p.is_file():
            return json.loads(p.read_text())
    return None


def relabel(data: ImageSet, class_names: list[str]) -> ImageSet:
    """``data`` restricted to the images whose class (by name) is in ``class_names``, relabelled into
    ``class_names``' index space. The one place where class indices of two models or sites are matched."""
    if data.labels is None:
        raise ValueError("relabel needs labelled images")
    index = {name: i for i, name in enumerate(class_names)}
    mapped = np.array([index.get(data.class_names[int(lab)], -1) for lab in data.labels], dtype=np.int64)
    keep = np.flatnonzero(mapped >= 0)
    return ImageSet(images=data.images[keep], labels=mapped[keep], class_names=list(class_names))


def align_to_test(synthetic: ImageSet, test: ImageSet) -> tuple[ImageSet, ImageSet] | None:
    """Synthetic images in the test set's class space, and the test images of the classes both know (None when
    either is unlabelled or they share no class)."""
    if synthetic.labels is None or test.labels is None:
        return None
    syn = relabel(synthetic, list(test.class_names))
    assert syn.labels is not None  # relabel keeps labels
    local = test.subset(np.flatnonzero(np.isin(test.labels, np.unique(syn.labels))))
    if len(syn) == 0 or len(local) == 0:
        return None
    return syn, local


# ----------------------------------------------------------------------------- the cache
def digest(obj: Any) -> str:
    """sha256 over arrays (dtype, shape, bytes), ImageSets, paths (file contents) and JSON-able values."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x)
            h.update(f"nd{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        elif isinstance(x, ImageSet):
            feed({"images": x.images, "labels": x.labels, "class_names": x.class_names,
                  "patient_ids": x.patient_ids, "prompts": x.prompts})
        elif isinstance(x, Path):
            from privdistill.stages import hash_tree, sha256_file

            feed(sha256_file(x) if x.is_file() else hash_tree(x))
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x):
                h.update(json.dumps(str(k)).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, list | tuple):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x, default=str).encode())

    feed(obj)
    return h.hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


class MeasureCache:
    """Results keyed by ``digest`` of their inputs under ``root`` (None: nothing cached). Each entry is written
    atomically; a corrupt entry is recomputed."""

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def _path(self, kind: str, key: dict[str, Any], suffix: str) -> Path | None:
        if self.root is None:
            return None
        from privdistill import __version__

        return self.root / f"{kind}-{digest({'key': key, 'version': __version__})[:32]}{suffix}"

    def _write(self, path: Path, write: Callable[[Path], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _get(self, kind: str, key: dict[str, Any], suffix: str, load: Callable[[Path], Any],
             save: Callable[[Any, Path], None], make: Callable[[], Any]) -> Any:
        path = self._path(kind, key, suffix)
        if path is not None and path.is_file():
            try:
                value = load(path)
                self.hits.append(kind)
                log.debug("measure.cache_hit", kind=kind)
                return value
            except Exception as err:  # a torn or foreign file: recompute and overwrite
                log.warning("measure.cache_unreadable", kind=kind, error=type(err).__name__)
        self.misses.append(kind)
        value = make()
        if path is not None:
            self._write(path, lambda p: save(value, p))
        return value

    def json(self, kind: str, key: dict[str, Any], make: Callable[[], Any]) -> Any:
        """A JSON-able result; returned as read back from JSON whether cached or not (same types either way)."""
        return self._get(kind, key, ".json", lambda p: json.loads(p.read_text()),
                         lambda v, p: _write_text(p, _dumps(v)), lambda: json.loads(_dumps(make())))

    def array(self, kind: str, key: dict[str, Any], make: Callable[[], np.ndarray]) -> np.ndarray:
        def save(v: np.ndarray, p: Path) -> None:
            with open(p, "wb") as fh:
                np.save(fh, v, allow_pickle=False)

        return self._get(kind, key, ".npy", lambda p: np.load(p, allow_pickle=False), save, make)

    def classifier(self, images: np.ndarray, labels: np.ndarray, n_classes: int, *, steps: int, batch_size: int,
                   seed: int) -> Classifier:
        """``classifier.train_classifier`` on these images, or its cached weights."""
        import torch

        from privdistill.classifier import Classifier, SmallCNN, train_classifier

        def load(p: Path) -> Classifier:
            model = SmallCNN(images.shape[1], n_classes)
            model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
            return Classifier(model=model.eval(), n_classes=n_classes)

        key = {"images": images, "labels": labels, "n_classes": n_classes, "steps": steps, "batch_size": batch_size,
               "seed": seed}
        return self._get("classifier", key, ".pt", load, lambda c, p: torch.save(c.model.state_dict(), p),
                         lambda: train_classifier(images, labels, n_classes, steps=steps, batch_size=batch_size,
                                                  seed=seed))

    def reid(self, key: dict[str, Any], make: Callable[[], ReidModel]) -> ReidModel:
        """A trained re-identification model (saved with ``reid.save_reid`` in a folder)."""
        import shutil

        from privdistill.reid import load_reid, save_reid

        path = self._path("reid", key, "")
        if path is not None and path.is_dir():
            try:
                model = load_reid(path)
                self.hits.append("reid")
                return model
            except Exception as err:  # a torn or foreign folder: recompute
                log.warning("measure.cache_unreadable", kind="reid", error=type(err).__name__)
        self.misses.append("reid")
        model = make()
        if path is not None:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=self._mkroot()))
            save_reid(model, tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        return model

    def _mkroot(self) -> Path:
        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root


# ----------------------------------------------------------------------------- the measurement
@dataclass
class RealSide:
    """What synthetic images are measured against; every field optional, a measurement runs where its inputs
    are given. ``train`` is at the analysis resolution already."""

    test: ImageSet | None = None  # labelled real/reference test images: TSTR
    feature_clf: Classifier | None = None  # trained on real/reference training images: FID features
    fid_features: np.ndarray | None = None  # features of the images FID compares with
    train: ImageSet | None = None  # training images: memorization (and re-id)
    reid_embed: Callable[[np.ndarray], np.ndarray] | None = None
    train_emb: np.ndarray | None = None  # reid_embed of train
    reid_threshold: float | None = None
    memorization_in_reid_space: bool = False  # the ratio test also in the re-id model's feature space
    fresh: np.ndarray | None = None  # held-out real images: data-copying AUC

    def key(self) -> dict[str, Any]:
        """A digestable description (for caching measurements of fixed synthetic sets)."""
        return {"test": self.test, "fid_features": self.fid_features, "train": self.train,
                "train_emb": self.train_emb, "reid_threshold": self.reid_threshold,
                "memorization_in_reid_space": self.memorization_in_reid_space, "fresh": self.fresh,
                "feature_clf": None if self.feature_clf is None else
                [t.detach().numpy() for t in self.feature_clf.model.state_dict().values()]}


def measure(synthetic: ImageSet, real: RealSide, ev: Settings, *, analysis_resolution: int | None,
            seed: int) -> dict[str, Any]:
    """Privacy and utility numbers of ``synthetic`` against ``real``, each with its n (and interval where it is
    a rate): memorization_*, data_copying_*, reid_*, tstr_*, fid_domain."""
    from privdistill.imaging import at_resolution

    out: dict[str, Any] = {"n_samples": len(synthetic)}
    syn_a = synthetic if analysis_resolution is None else at_resolution(synthetic, analysis_resolution)
    if real.train is not None:
        from privdistill.metrics import memorization

        embed = real.reid_embed if real.memorization_in_reid_space else None
        mem = memorization(syn_a.images, real.train, ratio=ev.memorization_ratio, embed=embed)
        # undecidable samples are reported, and the release gate counts them as memorized
        out.update({"memorization_rate": mem["rate"], "memorization_ci": mem["ci"], "memorization_n": mem["n"],
                    "memorization_undecidable": mem["undecidable"], "memorization_by_detector": mem["by_detector"]})
        if real.fresh is not None:
            out.update(copying(syn_a.images, real.train, real.fresh, analysis_resolution))
    if real.reid_embed is not None and real.train_emb is not None and real.reid_threshold is not None:
        from privdistill.audit.stats import clopper_pearson
        from privdistill.metrics import reid_rate

        rate = reid_rate(syn_a.images, real.train_emb, embed=real.reid_embed, threshold=real.reid_threshold)
        n = len(synthetic)
        out.update({"reid_rate": rate, "reid_ci95": clopper_pearson(int(round(rate * n)), n), "n_privacy_samples": n})
    if real.test is not None:
        out.update(tstr(synthetic, real.test, ev, seed=seed))
    if real.feature_clf is not None and real.fid_features is not None:
        from privdistill.classifier import features
        from privdistill.metrics import fid_domain

        out["fid_domain"] = fid_domain(real.fid_features, features(real.feature_clf, synthetic.images))
    return out


def tstr(synthetic: ImageSet, test: ImageSet, ev: Settings, *, seed: int) -> dict[str, Any]:
    """Train on the synthetic images, test on the real ones of the classes both know (matched by name)."""
    from privdistill.metrics import tstr_accuracy

    aligned = align_to_test(synthetic, test)
    if aligned is None:
        return {"tstr_accuracy": None, "tstr_classes": None}
    syn, local = aligned
    acc = tstr_accuracy(syn, local, len(test.class_names), steps=ev.classifier_steps,
                        batch_size=ev.classifier_batch_size, seed=seed)
    assert local.labels is not None  # align_to_test returns labelled sets
    return {"tstr_accuracy": acc, "tstr_n_test": len(local),
            "tstr_classes": sorted({test.class_names[int(i)] for i in local.labels})}


def copying(images: np.ndarray, train: ImageSet, fresh: np.ndarray, analysis_resolution: int | None,
            prefix: str = "") -> dict[str, Any]:
    """Data-copying AUC (samples vs fresh real images to the training set; 0.5 = no copying), its 95%
    bootstrap interval and n, under ``{prefix}data_copying_*`` keys."""
    from privdistill.imaging import resize_images
    from privdistill.metrics import data_copying

    if analysis_resolution is not None:
        images, fresh = resize_images(images, analysis_resolution), resize_images(fresh, analysis_resolution)
    dc = data_copying(images, train, fresh)
    return {f"{prefix}data_copying_auc": dc["auc"], f"{prefix}data_copying_ci": dc["ci"],
            f"{prefix}data_copying_distance_auc": dc["distance_auc"],
            f"{prefix}data_copying_n": {"samples": dc["n_samples"], "fresh": dc["n_fresh"]}}
