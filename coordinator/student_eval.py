"""Utility of the student measured at the coordinator: TSTR and domain FID on a public reference set,
and how often the student copies an image of its own (synthetic) training shards."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.seeds import derive_seed

if TYPE_CHECKING:
    from coordinator.student import TrainingConfig


def _restrict(ref: ImageSet, class_names: list[str], what: str) -> ImageSet:
    """``ref`` restricted to ``class_names`` and relabelled into their index space (matched by name)."""
    if ref.labels is None:
        raise DataError(f"the reference {what} set has no labels: set labels/class_names in evaluation.reference")
    missing = [n for n in class_names if n not in ref.class_names]
    if missing:
        raise DataError(
            f"the student generates classes {missing} that the reference {what} set lacks (it has "
            f"{ref.class_names}); list them in evaluation.reference.classes with the same class_names as the sites")
    names = np.asarray(ref.class_names)[ref.labels]
    keep = np.flatnonzero(np.isin(names, class_names))
    labels = np.asarray([class_names.index(n) for n in names[keep]], dtype=np.int64)
    return ImageSet(images=ref.images[keep], labels=labels, class_names=list(class_names))


def utility_report(samples: ImageSet, shards: ImageSet, cfg: TrainingConfig) -> dict[str, Any]:
    """Utility numbers (flat) plus ``reference``; which classifier gave the FID features is stated."""
    from privdistill.classifier import accuracy, features, train_classifier
    from privdistill.data.load import load_dataset
    from privdistill.metrics import fid_domain, memorization, tstr_accuracy

    ev = cfg.evaluation
    copies = memorization(samples.images, shards, ratio=ev.memorization_ratio)
    utility: dict[str, Any] = {
        "copy_rate_vs_training_shards": copies["rate"],
        "copy_rate_note": "fraction of student samples that copy one image of its synthetic training shards "
                          "(pixel-space criterion of privdistill.metrics.memorization); says nothing about patients",
        "tstr_accuracy": None, "shards_tstr_accuracy": None, "fid_domain": None, "fid_feature_classifier": None,
    }
    names = list(samples.class_names)
    steps, bs = ev.classifier_steps, ev.classifier_batch_size
    data_cfg = cfg.reference_data()
    if data_cfg is None:
        if shards.labels is not None:
            clf = train_classifier(shards.images, shards.labels, len(shards.class_names), steps=steps,
                                   batch_size=bs, seed=derive_seed(cfg.seed, "eval-classifier"))
            utility["fid_domain"] = fid_domain(features(clf, shards.images), features(clf, samples.images))
            utility["fid_feature_classifier"] = (
                "classifier trained on the pooled synthetic training shards; FID is student samples vs those "
                "shards (no public reference set is configured, so nothing is compared with real images)")
        return {**utility, "reference": {"configured": False}}

    loaded = load_dataset(data_cfg, seed=cfg.seed)
    ref_train, ref_test = _restrict(loaded.train, names, "train"), _restrict(loaded.test, names, "test")
    if len(ref_train) == 0 or len(ref_test) == 0:
        raise DataError("the reference set has no image of the student's classes in its train or test part")
    clf = train_classifier(ref_train.images, ref_train.labels, len(names), steps=steps, batch_size=bs,
                           seed=derive_seed(cfg.seed, "eval-classifier"))
    utility["fid_domain"] = fid_domain(features(clf, ref_test.images), features(clf, samples.images))
    utility["fid_feature_classifier"] = (
        "classifier trained on the public reference set's train part; FID is student samples vs its test part; "
        "domain-specific, comparable only between runs with the same reference and classifier settings")
    if samples.labels is not None:
        utility["tstr_accuracy"] = tstr_accuracy(samples, ref_test, len(names), steps=steps, batch_size=bs,
                                                 seed=derive_seed(cfg.seed, "coordinator-tstr-student"))
    if shards.labels is not None:
        utility["shards_tstr_accuracy"] = tstr_accuracy(shards, ref_test, len(names), steps=steps, batch_size=bs,
                                                        seed=derive_seed(cfg.seed, "coordinator-tstr-shards"))
    reference = {
        "configured": True,
        "description": ev.reference.description,
        "split": loaded.report["split"],
        "class_names": names,
        "excluded_classes": [n for n in loaded.test.class_names if n not in names],
        "n_train": len(ref_train),
        "n_test": len(ref_test),
        "trtr_accuracy": accuracy(clf, ref_test.images, ref_test.labels),
    }
    return {**utility, "reference": reference}
