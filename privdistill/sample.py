"""Sampling (DDIM, DPM-Solver++ or UniPC): N images per class or prompt, batched, deterministic given a seed."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import structlog
import torch
from tqdm.auto import tqdm

from privdistill.config import SampleConfig
from privdistill.data.types import ImageSet
from privdistill.errors import StageError
from privdistill.hub import sampling_scheduler
from privdistill.logs import progress_enabled
from privdistill.models import DiffusionModel

log = structlog.get_logger(__name__)


DEFAULT = SampleConfig()  # the one place the default solver and steps are set is SampleConfig


def make_solver(model: DiffusionModel, solver: str, eta: float = 0.0) -> Any:  # diffusers schedulers: untyped
    """A fresh sampling scheduler over the model's training noise schedule (as a diffusers pipeline swaps
    schedulers: ``from_config``); the multistep solvers keep state, so each batch gets its own. StageError for an
    unknown solver or an ``eta`` the solver does not take."""
    try:
        return sampling_scheduler(model.scheduler.config, solver, eta)
    except ValueError as err:
        raise StageError(str(err)) from None


@torch.inference_mode()
def sample_images(
    model: DiffusionModel, *, labels: np.ndarray | None = None, prompts: list[str] | None = None,
    solver: str = DEFAULT.solver, steps: int = DEFAULT.steps, eta: float = 0.0, batch_size: int = DEFAULT.batch_size,
    seed: int = 0,
    device: torch.device | None = None, progress: bool = True,
) -> np.ndarray:
    """Generate one image per label (or prompt) with ``steps`` model evaluations each; returns NCHW float32
    in [-1, 1].

    The starting noise of sample i is drawn from one generator seeded with ``seed``, so with eta = 0 (every
    solver here is then deterministic) the result does not depend on ``batch_size``."""
    n = len(labels) if labels is not None else len(prompts or [])
    if n == 0:
        raise StageError("nothing to sample: no labels or prompts given")
    device = device or next(model.unet.parameters()).device
    shape = (n, *model.sample_shape)  # a latent model denoises VAE latents and decodes them at the end
    g = torch.Generator().manual_seed(seed)
    x_all = torch.randn(shape, generator=g)
    out = np.empty((n, model.channels, model.resolution, model.resolution), dtype=np.float32)
    for m in model.modules():
        m.eval()
    batches = range(0, n, batch_size)
    bar = tqdm(batches, desc="sample", unit="batch", disable=not (progress and progress_enabled()), file=sys.stderr)
    for s in bar:
        e = min(n, s + batch_size)
        scheduler = make_solver(model, solver, eta)  # the first batch's call checks solver and eta
        scheduler.set_timesteps(steps)
        x = x_all[s:e].to(device) * scheduler.init_noise_sigma
        lab = None if labels is None else torch.as_tensor(labels[s:e]).long()
        pr = None if prompts is None else list(prompts[s:e])
        cond = model.condition(lab, pr, device)
        step_gen = torch.Generator().manual_seed(seed * 7919 + s)
        for t in scheduler.timesteps:
            eps = model.predict_noise(scheduler.scale_model_input(x, t), t.to(device).expand(len(x)), cond)
            if solver == "ddim":
                noise = torch.randn(x.shape, generator=step_gen).to(device) if eta > 0 else None
                x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            else:
                x = scheduler.step(eps, t, x).prev_sample
        out[s:e] = model.decode(x).clamp(-1, 1).float().cpu().numpy()
    return out


def ddim_sample(model: DiffusionModel, **kwargs: Any) -> np.ndarray:
    """``sample_images`` with the DDIM solver (kept for callers that name it)."""
    return sample_images(model, solver="ddim", **kwargs)


def sample_dataset(
    model: DiffusionModel, cfg: SampleConfig, *, seed: int, prompt_labels: dict[str, int | None] | None = None,
    device: torch.device | None = None,
) -> ImageSet:
    """``cfg.per_class`` samples for each class (class conditioning) or for each distinct training
    prompt (text conditioning; ``prompt_labels`` maps each prompt to its class, or None)."""
    if model.conditioning == "class":
        k = len(model.class_names)
        labels = np.repeat(np.arange(k, dtype=np.int64), cfg.per_class)
        imgs = sample_images(model, labels=labels, solver=cfg.solver, steps=cfg.steps, eta=cfg.eta, batch_size=cfg.batch_size, seed=seed, device=device)
        return ImageSet(images=imgs, labels=labels, class_names=list(model.class_names))
    if not prompt_labels:
        raise StageError("text-conditional sampling needs the training prompts")
    distinct = sorted(prompt_labels)
    plist = [p for p in distinct for _ in range(cfg.per_class)]
    imgs = sample_images(model, prompts=plist, solver=cfg.solver, steps=cfg.steps, eta=cfg.eta, batch_size=cfg.batch_size, seed=seed, device=device)
    plabels = (np.array([prompt_labels[p] for p in plist], dtype=np.int64)
               if all(prompt_labels[p] is not None for p in distinct) else None)
    return ImageSet(images=imgs, labels=plabels, prompts=plist, class_names=list(model.class_names))


def prompt_label_map(data: ImageSet) -> dict[str, int | None]:
    """Each distinct prompt of a training set with its most frequent label (None without labels)."""
    if data.prompts is None:
        return {}
    out: dict[str, int | None] = {}
    for p in sorted(set(data.prompts)):
        if data.labels is None:
            out[p] = None
            continue
        labs = data.labels[[i for i, q in enumerate(data.prompts) if q == p]]
        out[p] = int(np.bincount(labs).argmax())
    return out
