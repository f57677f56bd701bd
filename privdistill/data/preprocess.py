"""Raw images -> model input: intensities to [0, 1], channels, square resize, float32 NCHW in [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from privdistill.errors import DataError

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's convert("L")


def to_unit(image: np.ndarray) -> np.ndarray:
    """Intensities to float32 [0, 1]: uint8 and uint16 by their dtype range (so relative brightness
    across images is kept); floats and other integer types by the image's own min/max (a constant
    image becomes 0)."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    a = a.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros_like(a)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(finite, a, lo)  # NaN/inf become the darkest value
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HW / HWC (C in 1, 3, 4; alpha dropped) -> HWC with ``channels`` channels (gray <-> RGB by luma)."""
    a = image[..., None] if image.ndim == 2 else image
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"cannot interpret image of shape {image.shape} as gray or RGB")
    if a.shape[-1] == 2:  # gray + alpha
        a = a[..., :1]
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.shape[-1] == channels:
        return a
    if channels == 1:
        return (a @ _LUMA)[..., None]
    return np.repeat(a, 3, axis=-1)


def resize_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """HWC float -> [resolution, resolution, C]: scale the shorter side to ``resolution`` (bicubic,
    antialiased when shrinking), then centre-crop the longer side; values clipped to [0, 1]."""
    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    s = resolution / min(h, w)
    nh, nw = max(resolution, round(h * s)), max(resolution, round(w * s))
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c]))
            .resize((nw, nh), Image.Resampling.BICUBIC)
            .crop(box)
        )
        for c in range(image.shape[-1])
    ]
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)


def preprocess_image(image: np.ndarray, *, resolution: int, channels: int) -> np.ndarray:
    """One HW/HWC image (uint8, uint16 or float) -> float32 [C, resolution, resolution] in [-1, 1]."""
    x = resize_square(to_channels(to_unit(image), channels).astype(np.float32), resolution)
    return np.transpose(x * 2.0 - 1.0, (2, 0, 1)).astype(np.float32)


def preprocess_images(images: Sequence[np.ndarray], *, resolution: int, channels: int) -> np.ndarray:
    """Images of any size/dtype -> float32 [N, channels, resolution, resolution] in [-1, 1]."""
    out = np.empty((len(images), channels, resolution, resolution), np.float32)
    for i, img in enumerate(images):
        out[i] = preprocess_image(img, resolution=resolution, channels=channels)
    return out
