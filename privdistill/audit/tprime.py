"""t': the largest noise level t at which noising a fingerprinted training image to t and denoising it
back still reproduces its fingerprint (for a majority of noise seeds). The larger t', the more of the
score function encodes that individual (Dombrowski & Kainz)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from privdistill.audit.mia import conditioning_for
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.models import DiffusionModel

Reconstruct = Callable[[np.ndarray, int, int], np.ndarray]  # (images, t, seed) -> denoised images
Detect = Callable[[np.ndarray], np.ndarray]  # images -> bool [N]

DEFAULT_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def grid_timesteps(num_train_timesteps: int, fractions: Sequence[float] = DEFAULT_GRID) -> list[int]:
    """Distinct integer timesteps for the given fractions of the schedule, ascending."""
    return sorted({min(num_train_timesteps - 1, max(1, int(round(f * num_train_timesteps)))) for f in fractions})


def estimate_tprime(images: np.ndarray, *, reconstruct: Reconstruct, detect: Detect, grid: Sequence[int],
                    seeds: int = 4) -> dict[str, Any]:
    """For every image and grid level t: noise to t and denoise with ``seeds`` noise seeds; the fingerprint
    "comes back" at t when ``detect`` says yes for a strict majority. t' = the largest such t (0 if none).

    Returns ``t_prime`` (int per image) and ``returned`` (fraction of seeds per image and level)."""
    if seeds < 1 or not len(grid):
        raise DataError("the t' search needs at least one seed and one grid level")
    grid = sorted(int(t) for t in grid)
    frac = np.zeros((len(images), len(grid)), np.float64)
    for j, t in enumerate(grid):
        for s in range(seeds):
            frac[:, j] += np.asarray(detect(reconstruct(images, t, s)), bool)
    frac /= seeds
    back = frac > 0.5
    t_prime = [max((t for t, ok in zip(grid, row) if ok), default=0) for row in back]
    return {"grid": grid, "seeds": seeds, "t_prime": t_prime, "returned": frac.round(4).tolist()}


@torch.no_grad()
def ddim_reconstruct(model: DiffusionModel, data: ImageSet, t: int, seed: int, *, full_steps: int = 50,
                     device: torch.device | None = None) -> np.ndarray:
    """Noise ``data``'s images to timestep ``t`` (DDPM forward, noise seeded by ``seed``) and denoise back
    to 0 with deterministic DDIM in ~``full_steps * t / T`` steps (at least 2). NCHW in [-1, 1]."""
    device = device or next(model.unet.parameters()).device
    keep, labels, prompts = conditioning_for(model, data)
    if len(keep) != len(data):
        raise DataError("the model cannot be conditioned on every fingerprinted image (unknown class)")
    total = int(model.scheduler.config.num_train_timesteps)
    alphas = model.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    x0 = model.encode(torch.from_numpy(np.ascontiguousarray(data.images, np.float32)).to(device))  # latent: VAE
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 7_919 + t)).to(device)
    a_t = alphas[t]
    x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    n = max(2, math.ceil(full_steps * t / total))
    steps = sorted({int(round(v)) for v in np.linspace(t, 0, n + 1)[:-1]}, reverse=True)
    cond = model.condition(None if labels is None else torch.from_numpy(labels), prompts, device)
    for m in model.modules():
        m.eval()
    for i, cur in enumerate(steps):
        a_cur = alphas[cur]
        a_prev = alphas[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, device=device)
        eps = model.predict_noise(x, torch.full((len(x),), cur, device=device, dtype=torch.long), cond).float()
        x0_hat = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x0_hat = x0_hat.clamp(-1, 1) if model.vae is None else x0_hat  # latents are not bounded
        x = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    return model.decode(x).clamp(-1, 1).cpu().numpy()


def model_tprime(model: DiffusionModel, fingerprinted: ImageSet, detect: Detect, *, grid: Sequence[int] | None = None,
                 seeds: int = 4, full_steps: int = 50) -> dict[str, Any]:
    """t' of every fingerprinted training image under ``model`` (grid: DEFAULT_GRID of its schedule)."""
    total = int(model.scheduler.config.num_train_timesteps)
    grid = list(grid) if grid is not None else grid_timesteps(total)

    def reconstruct(images: np.ndarray, t: int, seed: int) -> np.ndarray:
        part = ImageSet(images=images, labels=fingerprinted.labels, prompts=fingerprinted.prompts,
                        class_names=fingerprinted.class_names)
        return ddim_reconstruct(model, part, t, seed, full_steps=full_steps)

    out = estimate_tprime(fingerprinted.images, reconstruct=reconstruct, detect=detect, grid=grid, seeds=seeds)
    out["num_train_timesteps"] = total
    out["t_prime_fraction"] = [t / total for t in out["t_prime"]]
    return out
