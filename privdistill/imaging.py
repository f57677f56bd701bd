"""Image helpers shared by stages and pages: [-1, 1] float arrays to uint8, PNG grids, PNG data: URIs, and
the downsampling to the privacy checks' analysis resolution."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from privdistill.data.types import ImageSet


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a data: URI, for pages that must not load anything from elsewhere."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """NCHW float in [-1, 1] -> NHWC uint8 (C squeezed away for grayscale)."""
    x = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    x = np.transpose(x, (0, 2, 3, 1))
    return x[..., 0] if x.shape[-1] == 1 else x


def grid(images: np.ndarray, ncols: int = 8, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile NCHW [-1, 1] images into one PIL image (white padding)."""
    u8 = to_uint8(images)
    if u8.ndim == 3:
        u8 = u8[..., None].repeat(3, axis=-1)
    n = max(len(u8), 1)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    h, w = (u8.shape[1], u8.shape[2]) if len(u8) else (8, 8)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(u8):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = img
    out = Image.fromarray(canvas)
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
    return out


def save_grid(images: np.ndarray, path: Path, ncols: int = 8, scale: int = 2) -> Path:
    grid(images, ncols=ncols, scale=scale).save(path)
    return path


def resize_images(images: np.ndarray, size: int, *, chunk: int = 256) -> np.ndarray:
    """NCHW float32 images -> ``size`` x ``size`` (antialiased bilinear, in chunks of ``chunk`` images so
    memory stays bounded); returned as they are when already that size."""
    import torch
    import torch.nn.functional as F

    if images.shape[-2:] == (size, size):
        return images
    out = np.empty((*images.shape[:2], size, size), np.float32)
    for s in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + chunk], np.float32))
        out[s : s + chunk] = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(-1, 1).numpy()
    return out


def at_resolution(data: ImageSet, size: int) -> ImageSet:
    """The same set (labels, prompts, patient ids) with its images resized to ``size`` (see resize_images)."""
    if data.images.shape[-2:] == (size, size):
        return data
    return dataclasses.replace(data, images=resize_images(data.images, size))
