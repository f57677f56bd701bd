"""Batched image augmentations for the ViT's training: weak (shift) and strong (shift, gain, noise, cutout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Each image translated by up to ``max_shift`` px per axis; borders replicate the edge pixels."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def weak(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift by up to 1 px: the view the EMA teacher pseudo-labels and the labelled batches see."""
    return shift(x, 1, g)


def strong(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift by up to 2 px, gain x[0.8, 1.2] about the image mean, Gaussian noise (sd 0.05) and one
    cutout square of a quarter of the side filled with the image mean: the view the student learns from."""
    n, _, h, w = x.shape
    x = shift(x, 2, g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    gain = 0.8 + 0.4 * torch.rand((n, 1, 1, 1), generator=g)
    x = (x - mean) * gain + mean + 0.05 * torch.randn(x.shape, generator=g)
    side = max(1, h // 4)
    top = torch.randint(0, h - side + 1, (n,), generator=g)
    left = torch.randint(0, w - side + 1, (n,), generator=g)
    rr, cc = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    hole = ((rr >= top[:, None, None]) & (rr < top[:, None, None] + side)
            & (cc >= left[:, None, None]) & (cc < left[:, None, None] + side))[:, None]
    x = torch.where(hole, mean.expand_as(x), x)
    return x.clamp(-1.0, 1.0)
