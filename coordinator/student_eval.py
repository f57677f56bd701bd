"""Utility of the student measured at the coordinator: TSTR and domain FID on a public reference set,
and how often the student copies an image of its own (synthetic) training shards."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.measure import MeasureCache, RealSide, measure, relabel, tstr
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
    return relabel(ref, class_names)


def utility_report(samples: ImageSet, shards: ImageSet, cfg: TrainingConfig,
                   cache: MeasureCache | None = None) -> dict[str, Any]:
    """Utility numbers (flat) plus ``reference``; which classifier gave the FID features is stated. ``cache``:
    the reference-set classifier is kept there, keyed by its inputs, for the next student."""
    from privdistill.classifier import accuracy, features
    from privdistill.data.load import load_dataset

    ev = cfg.evaluation
    cache = cache or MeasureCache(None)
    names = list(samples.class_names)
    steps, bs = ev.classifier_steps, ev.classifier_batch_size
    data_cfg = cfg.reference_data()
    clf = ref_test = None
    if data_cfg is None:
        if shards.labels is not None:
            clf = cache.classifier(shards.images, shards.labels, len(shards.class_names), steps=steps, batch_size=bs,
                                   seed=derive_seed(cfg.seed, "eval-classifier"))
        fid_real = None if clf is None else features(clf, shards.images)
    else:
        loaded = load_dataset(data_cfg, seed=cfg.seed)
        ref_train, ref_test = _restrict(loaded.train, names, "train"), _restrict(loaded.test, names, "test")
        if len(ref_train) == 0 or len(ref_test) == 0:
            raise DataError("the reference set has no image of the student's classes in its train or test part")
        assert ref_train.labels is not None  # _restrict keeps labels
        clf = cache.classifier(ref_train.images, ref_train.labels, len(names), steps=steps, batch_size=bs,
                               seed=derive_seed(cfg.seed, "eval-classifier"))
        fid_real = features(clf, ref_test.images)
    # one measurement (privdistill.measure): copies of the training shards, FID, TSTR on the reference test part
    m = measure(samples, RealSide(test=ref_test, feature_clf=clf, fid_features=fid_real, train=shards),
                ev, analysis_resolution=None, seed=derive_seed(cfg.seed, "coordinator-tstr-student"))
    utility: dict[str, Any] = {
        "copy_rate_vs_training_shards": m["memorization_rate"],
        "copy_rate_note": "fraction of student samples that copy one image of its synthetic training shards "
                          "(pixel-space criterion of privdistill.metrics.memorization); says nothing about patients",
        "tstr_accuracy": None, "shards_tstr_accuracy": None, "fid_domain": m.get("fid_domain"),
        "fid_feature_classifier": None,
    }
    if data_cfg is None:
        if clf is not None:
            utility["fid_feature_classifier"] = (
                "classifier trained on the pooled synthetic training shards; FID is student samples vs those "
                "shards (no public reference set is configured, so nothing is compared with real images)")
        return {**utility, "reference": {"configured": False}}

    assert ref_test is not None and ref_test.labels is not None and clf is not None
    assert ev.reference is not None  # reference_data() returned a data config from it
    utility["fid_feature_classifier"] = (
        "classifier trained on the public reference set's train part; FID is student samples vs its test part; "
        "domain-specific, comparable only between runs with the same reference and classifier settings")
    utility["tstr_accuracy"] = m.get("tstr_accuracy")
    if shards.labels is not None:
        utility["shards_tstr_accuracy"] = tstr(shards, ref_test, ev,
                                               seed=derive_seed(cfg.seed, "coordinator-tstr-shards"))["tstr_accuracy"]
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
