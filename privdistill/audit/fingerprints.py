"""Adversarial fingerprints (Dombrowski & Kainz): small identifying markers -- a filled circle or a
blended patch at a random position -- planted into copies of chosen training images."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from privdistill.data.types import ImageSet
from privdistill.errors import DataError

Kind = Literal["circle", "patch"]


@dataclass(frozen=True)
class Fingerprint:
    """One marker: its kind, top-left corner (y, x) and size in pixels; ``pattern`` seeds a patch's texture."""

    kind: Kind
    y: int
    x: int
    size: int
    pattern: int = 0

    def mask_and_value(self, channels: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(alpha [H, W] in [0, 1], marker image [C, H, W] in [-1, 1]): the image becomes
        ``(1 - alpha) * image + alpha * marker``."""
        alpha = np.zeros((height, width), np.float32)
        value = np.zeros((channels, height, width), np.float32)
        s, y, x = self.size, self.y, self.x
        if self.kind == "circle":
            # a bright disc inside a dark ring: visible on dark background and on bright tissue alike
            yy, xx = np.mgrid[0 : s + 2, 0 : s + 2].astype(np.float32) - (s + 1) / 2
            r = np.sqrt(yy**2 + xx**2)
            ring = r <= (s + 2) / 2
            disc = r <= s / 2 - 0.25
            alpha[y : y + s + 2, x : x + s + 2] = ring
            value[:, y : y + s + 2, x : x + s + 2] = np.where(disc, 1.0, -1.0)
        else:
            # a high-contrast random checkerboard of 1-px cells, blended at 85%
            cells = np.random.default_rng(self.pattern).integers(0, 2, (s + 2, s + 2)) * 2.0 - 1.0
            alpha[y : y + s + 2, x : x + s + 2] = 0.85
            value[:, y : y + s + 2, x : x + s + 2] = cells
        return alpha, value

    def apply(self, images: np.ndarray, strength: float | np.ndarray = 1.0) -> np.ndarray:
        """A copy of NCHW ``images`` carrying this fingerprint (``strength`` scales its opacity)."""
        _, c, h, w = images.shape
        alpha, value = self.mask_and_value(c, h, w)
        a = alpha[None, None] * np.asarray(strength, np.float32).reshape(-1, 1, 1, 1)
        return ((1 - a) * images + a * value[None]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_fingerprints(k: int, *, height: int, width: int, seed: int) -> list[Fingerprint]:
    """``k`` fingerprints alternating circle / patch, each at a random position clear of the border,
    sized ~1/6 of the image (at least 2 px)."""
    size = max(2, min(height, width) // 6)
    margin = 1
    span_y, span_x = height - size - 2 - 2 * margin, width - size - 2 - 2 * margin
    if span_y < 0 or span_x < 0:
        raise DataError(f"images of {height}x{width} px are too small for a fingerprint of {size + 2} px")
    rng = np.random.default_rng([seed, 0xF1A6])
    out = []
    for i in range(k):
        y, x = (int(v) for v in rng.integers(0, [span_y + 1, span_x + 1]) + margin)
        out.append(Fingerprint("circle" if i % 2 == 0 else "patch", y, x, size, int(rng.integers(1 << 30))))
    return out


@dataclass
class Planted:
    """A training set with fingerprinted copies in place of ``k`` images of ``k`` distinct patients
    (fingerprint i present ``doses[i]`` times: the first in place, the others appended as copies)."""

    data: ImageSet  # the training set the audited teacher learns from
    indices: np.ndarray  # int64 [k]: which training images carry a fingerprint (the first copy of each)
    fingerprints: list[Fingerprint]
    doses: list[int] | None = None  # times each fingerprinted image is in ``data`` (None: once each)

    @property
    def images(self) -> np.ndarray:
        return self.data.images[self.indices]


def plant(train: ImageSet, k: int, *, seed: int, doses: tuple[int, ...] = (1,)) -> Planted:
    """Replace one image of each of ``k`` randomly chosen patients by a copy carrying fingerprint i; with
    ``doses`` (e.g. (1, 2, 4)), fingerprint i is in the training set doses[i % len(doses)] times (extra
    copies appended with the same patient id), so the audit can show t' respond to exposure."""
    if not doses or min(doses) < 1:
        raise DataError("fingerprint doses must be positive integers, e.g. 1,2,4")
    if k < 1:
        raise DataError("the fingerprint audit needs at least one fingerprint (--fingerprints K, K >= 1)")
    pids = train.patient_ids if train.patient_ids is not None else np.arange(len(train)).astype(str)
    patients = np.unique(pids)
    if k > len(patients):
        raise DataError(f"{k} fingerprints need {k} distinct patients; the training set has {len(patients)}")
    rng = np.random.default_rng([seed, 0x9A17])
    chosen = rng.choice(patients, size=k, replace=False)
    idx = np.array([rng.choice(np.flatnonzero(pids == p)) for p in chosen], np.int64)
    _, _, h, w = train.images.shape
    fps = make_fingerprints(k, height=h, width=w, seed=seed)
    data = train.subset(np.arange(len(train)))  # a copy: the run's own training set is not touched
    for i, fp in zip(idx, fps, strict=True):
        data.images[i] = fp.apply(data.images[i : i + 1])[0]
    dose = [int(doses[j % len(doses)]) for j in range(k)]
    extra = np.concatenate([np.full(d - 1, i, np.int64) for i, d in zip(idx, dose, strict=True)]) if max(dose) > 1 else None
    if extra is not None:
        data = _concat(data, data.subset(extra))
    return Planted(data=data, indices=idx, fingerprints=fps, doses=dose)


def _concat(a: ImageSet, b: ImageSet) -> ImageSet:
    def cat(x: Any, y: Any) -> Any:
        if x is None:
            return None
        return np.concatenate([np.asarray(x), np.asarray(y)]) if isinstance(x, np.ndarray) else list(x) + list(y)

    return ImageSet(images=np.concatenate([a.images, b.images]), labels=cat(a.labels, b.labels),
                    prompts=cat(a.prompts, b.prompts), patient_ids=cat(a.patient_ids, b.patient_ids),
                    class_names=list(a.class_names))
