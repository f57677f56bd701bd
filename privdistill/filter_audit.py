"""Checks of the filter that do not trust the filter: its recall on planted copies of training
images (known-identifiable cases) and how many fresh real images of other patients it would drop."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import structlog

from privdistill.config import FilterConfig
from privdistill.data.types import ImageSet
from privdistill.filter import filter_synthetic

log = structlog.get_logger(__name__)

MAX_PLANTED = 50
MAX_HELDOUT = 500


def plant_copies(train: ImageSet, n: int, seed: int) -> dict[str, np.ndarray]:
    """Exact and near copies (1-px shift, Gaussian noise σ=0.1, contrast ×0.9) of n training images."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train), size=min(n, len(train)), replace=False))
    x = train.images[idx]
    return {
        "exact": x.copy(),
        "shift_1px": np.roll(x, shift=1, axis=-1),
        "noise_0.1": np.clip(x + rng.normal(0, 0.1, x.shape).astype(np.float32), -1, 1),
        "contrast_0.9": np.clip(x * 0.9, -1, 1).astype(np.float32),
    }


def audit_filter(
    train: ImageSet, heldout: ImageSet, *, embed: Callable[[np.ndarray], np.ndarray], threshold: float,
    cfg: FilterConfig, real_embeddings: np.ndarray, seed: int,
) -> dict[str, Any]:
    """Aggregate rates only: recall per kind of planted copy, and the drop rate on held-out real images."""
    active = cfg.model_copy(update={"enabled": True})

    def drop_rate(images: np.ndarray) -> float:
        res = filter_synthetic(ImageSet(images=images), train, embed=embed, threshold=threshold, cfg=active,
                               real_embeddings=real_embeddings)
        return float(len(res.dropped) / max(1, len(images)))

    recall = {kind: drop_rate(imgs) for kind, imgs in plant_copies(train, MAX_PLANTED, seed).items()}
    out: dict[str, Any] = {"planted_recall": recall, "planted_per_kind": min(MAX_PLANTED, len(train))}
    if len(heldout):
        sel = np.random.default_rng(seed + 1).permutation(len(heldout))[:MAX_HELDOUT]
        out["heldout_real_dropped_rate"] = drop_rate(heldout.images[sel])
        out["heldout_real_n"] = int(len(sel))
    log.info("filter.audit", **{f"recall_{k}": round(v, 3) for k, v in recall.items()},
             heldout_real_dropped_rate=out.get("heldout_real_dropped_rate"))
    return out
