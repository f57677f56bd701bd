"""The filter's own audit: recall on planted copies and drop rate on fresh real images, aggregated."""

from __future__ import annotations

import json

import numpy as np

from privdistill.config import FilterConfig
from privdistill.data.types import ImageSet
from privdistill.filter_audit import audit_filter, plant_copies


def _embed(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float32)
    flat = flat - flat.mean(1, keepdims=True)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def _blobs(n: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    imgs = np.clip(rng.normal(0, 0.6, (n, 1, 12, 12)), -1, 1).astype(np.float32)
    return ImageSet(images=imgs, labels=np.zeros(n, np.int64), patient_ids=np.array([f"p{seed}-{i}" for i in range(n)]),
                    class_names=["x"])


def test_planted_copies_are_recalled_and_fresh_images_mostly_kept() -> None:
    train, fresh = _blobs(60, 0), _blobs(40, 1)
    emb = _embed(train.images)
    out = audit_filter(train, fresh, embed=_embed, threshold=0.9, cfg=FilterConfig(enabled=False),
                       real_embeddings=emb, seed=0)
    assert out["planted_recall"]["exact"] == 1.0  # audit runs the filter even where it is disabled
    assert out["planted_recall"]["noise_0.1"] == 1.0
    assert out["planted_per_kind"] == 50
    assert out["heldout_real_n"] == 40 and out["heldout_real_dropped_rate"] == 0.0
    json.dumps(out)  # aggregate, JSON-safe


def test_plant_copies_kinds_and_sizes() -> None:
    copies = plant_copies(_blobs(10, 2), 4, seed=0)
    assert set(copies) == {"exact", "shift_1px", "noise_0.1", "contrast_0.9"}
    assert all(v.shape == (4, 1, 12, 12) and v.min() >= -1 and v.max() <= 1 for v in copies.values())
