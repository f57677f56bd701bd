"""Downstream evaluators beside the fully labelled CNN (`privdistill.classifier`): a small ViT trained on a
fraction of labelled images, and Semi-ViT, which also learns from the rest of the images, unlabelled."""

from __future__ import annotations

from typing import Any

import numpy as np

from privdistill.config import DownstreamConfig
from privdistill.downstream.semi_vit import Trained, split_labelled, train_vit
from privdistill.downstream.vit import ViTClassifier, accuracy, predict

__all__ = ["Trained", "ViTClassifier", "accuracy", "downstream_accuracy", "fit", "predict", "split_labelled", "train_vit"]


def fit(images: np.ndarray, labels: np.ndarray, n_classes: int, cfg: DownstreamConfig, *, seed: int) -> Trained:
    """Hide the labels of all but ``cfg.label_fraction`` of the images (per class, at least one each), then
    train ``cfg.model``: ``vit`` on the labelled images only, ``semi_vit`` on those plus the rest unlabelled."""
    if cfg.model not in ("vit", "semi_vit"):
        raise ValueError(f"fit() trains the ViT evaluators ('vit', 'semi_vit'), not {cfg.model!r}; "
                         "the CNN is privdistill.classifier.train_classifier")
    labels = np.asarray(labels)
    split_ss, train_ss = np.random.SeedSequence(seed).spawn(2)
    lab, unl = split_labelled(labels, cfg.label_fraction, int(split_ss.generate_state(1)[0]))
    semi = cfg.model == "semi_vit" and len(unl) > 0
    return train_vit(
        images[lab], labels[lab], n_classes, cfg, seed=int(train_ss.generate_state(1)[0]),
        unlabelled=images[unl] if semi else None, unlabelled_truth=labels[unl] if semi else None,
    )


def downstream_accuracy(
    train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
    n_classes: int, cfg: DownstreamConfig, *, seed: int,
) -> dict[str, Any]:
    """Accuracy on the test images of ``fit`` on the training images, with what training saw."""
    trained = fit(train_images, train_labels, n_classes, cfg, seed=seed)
    return {"accuracy": accuracy(trained.model, test_images, test_labels), **trained.stats}
