"""Simulated repeat acquisitions ("visits") of each patient, for demo data that has no patient ids."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from privdistill.config import VisitsConfig
from privdistill.data.types import ImageSet

_STREAM = 0x7615  # keeps the visit RNG independent of the split/subset RNGs for the same seed


def perturb(image: np.ndarray, *, shift: tuple[int, int], angle_deg: float, gain: float) -> np.ndarray:
    """One CHW [-1, 1] image rotated by ``angle_deg`` about its centre, shifted by ``shift`` (dy, dx)
    pixels (edges replicated), and its intensity on the [0, 1] scale multiplied by ``gain``."""
    h, w = image.shape[-2:]
    t = np.deg2rad(angle_deg)
    inv = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # output -> input rotation
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - inv @ (centre + np.asarray(shift, float))
    out = np.stack([ndimage.affine_transform(c, inv, offset=offset, order=1, mode="nearest") for c in image])
    return np.clip((out + 1.0) * gain - 1.0, -1.0, 1.0).astype(np.float32)


def apply_visits(images: ImageSet, cfg: VisitsConfig, *, seed: int) -> ImageSet:
    """Each image (one patient) becomes ``cfg.count`` visits, each independently perturbed: integer
    shift up to ``max_shift`` px, rotation up to ``max_rotation_deg``, gain 1 +/- ``intensity_jitter``.

    Visits of one patient are consecutive and share its patient id, label and prompt. The loader
    applies this to the training split only, so the test split keeps the source images as they are."""
    n = len(images)
    out = images.subset(np.repeat(np.arange(n), cfg.count))
    rng = np.random.default_rng([seed, _STREAM])
    shifts = rng.integers(-cfg.max_shift, cfg.max_shift + 1, size=(len(out), 2))
    angles = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, size=len(out))
    gains = 1.0 + rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter, size=len(out))
    for i in range(len(out)):
        out.images[i] = perturb(
            out.images[i],
            shift=(int(shifts[i, 0]), int(shifts[i, 1])),
            angle_deg=float(angles[i]),
            gain=float(gains[i]),
        )
    return out
