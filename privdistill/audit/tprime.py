"""t': how much noise a fingerprinted training image survives. Noise it to level t, denoise it back with
``seeds`` noise seeds, and ask the detector whether the fingerprint returned; the reproduction rate at t
is the fraction of seeds for which it did. t' is the last level BEFORE THE FIRST FAILURE (rate <= 1/2),
found by bisection on [t_min, t_max] with a check below the bracket (so a curve that fails at 150 and
comes back at 900 gives ~100, not 900). The larger t', the more of the score function encodes that
individual (Dombrowski & Kainz)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from privdistill.audit.mia import conditioning_for
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.models import DiffusionModel

Reconstruct = Callable[[np.ndarray, int, int], np.ndarray]  # (images, t, seed) -> denoised images
ReconstructSeeds = Callable[[int, int, list[int]], np.ndarray]  # (image index, t, seeds) -> [S, 1, ...]
Detect = Callable[[np.ndarray], np.ndarray]  # images -> bool [N]

DEFAULT_SEEDS = 16  # per level: a 1/2 majority is then decided within +-0.25 at 95% (Clopper-Pearson, 8 of 16)
MAX_ROUNDS = 6  # bisection restarts after a failure found below the bracket


def first_failure_tprime(outcomes: dict[int, np.ndarray], rows: np.ndarray | None = None) -> int:
    """t' from per-level seed outcomes {t: bool[seeds]}: the largest evaluated level such that it and every
    evaluated level below it reproduce the fingerprint for a strict majority of (the ``rows`` of) seeds;
    0 when the lowest level already fails."""
    best = 0
    for t in sorted(outcomes):
        o = outcomes[t] if rows is None else outcomes[t][rows]
        if not o.mean() > 0.5:
            break
        best = t
    return best


def _bisect_one(rate_at: Callable[[int], np.ndarray], t_min: int, t_max: int, tol: int, check_below: int
                ) -> dict[int, np.ndarray]:
    """Evaluate levels adaptively for ONE image; return every evaluated level's seed outcomes."""
    seen: dict[int, np.ndarray] = {}

    def ok(t: int) -> bool:
        if t not in seen:
            seen[t] = rate_at(t)
        return bool(seen[t].mean() > 0.5)

    if not ok(t_min):
        return seen
    lo, hi = t_min, t_max + 1  # lo passes; hi fails (t_max + 1: beyond the schedule)
    if ok(t_max):
        lo = t_max
    for _ in range(MAX_ROUNDS):
        while hi - lo > tol:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        # the first failure might lie below lo (a non-monotone curve): probe evenly spaced levels under it
        probes = [int(round(t_min + (lo - t_min) * k / (check_below + 1))) for k in range(1, check_below + 1)]
        failed = [t for t in sorted(set(probes)) if t_min < t < lo and not ok(t)]
        if not failed:
            break
        hi = failed[0]
        lo = max(t for t, o in seen.items() if t < hi and o.mean() > 0.5)
    return seen


def estimate_tprime(
    images: np.ndarray, *, detect: Detect, t_max: int, reconstruct: Reconstruct | None = None,
    reconstruct_seeds: ReconstructSeeds | None = None, seeds: int = DEFAULT_SEEDS, t_min: int = 1,
    tol: int | None = None, check_below: int = 4,
) -> dict[str, Any]:
    """t' of every image (first failure, bisection to ``tol`` timesteps, default t_max/64) with the
    evaluated levels' reproduction counts: ``t_prime`` [N], ``bracket`` [N][lo, first failing level],
    ``levels`` [N]{t: [k, seeds]} and ``outcomes`` (per-seed booleans, for intervals; local only)."""
    if seeds < 1 or t_max < t_min or t_min < 1:
        raise DataError("the t' search needs at least one seed and 1 <= t_min <= t_max")
    if (reconstruct is None) == (reconstruct_seeds is None):
        raise DataError("estimate_tprime needs exactly one of reconstruct / reconstruct_seeds")
    tol = max(1, tol if tol is not None else t_max // 64)
    seed_list = list(range(seeds))
    out: dict[str, Any] = {"seeds": seeds, "t_min": t_min, "t_max": t_max, "tol": tol, "t_prime": [], "bracket": [],
                           "levels": [], "outcomes": [], "definition": "last level before the first failure "
                           "(strict majority of seeds), bisection with a check below the bracket"}
    for i in range(len(images)):
        one = images[i : i + 1]

        def rate_at(t: int, one: np.ndarray = one, i: int = i) -> np.ndarray:
            if reconstruct_seeds is not None:
                rec = np.asarray(reconstruct_seeds(i, t, seed_list))
                return np.array([bool(np.asarray(detect(r))[0]) for r in rec])
            assert reconstruct is not None  # exactly one of reconstruct / reconstruct_seeds (checked above)
            return np.array([bool(np.asarray(detect(reconstruct(one, t, s)))[0]) for s in seed_list])

        seen = _bisect_one(rate_at, t_min, t_max, tol, check_below)
        tp = first_failure_tprime(seen)
        above = [t for t in sorted(seen) if t > tp]
        out["t_prime"].append(tp)
        out["bracket"].append([tp, above[0] if above else None])
        out["levels"].append({str(t): [int(o.sum()), len(o)] for t, o in sorted(seen.items())})
        out["outcomes"].append(seen)
    return out


def tprime_difference(fp: dict[int, np.ndarray], ctrl: dict[int, np.ndarray], *, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """t'(fingerprinted) - t'(control) with a 95% percentile interval, resampling noise seeds (with
    replacement) on both sides and re-deriving both t' from the levels evaluated."""
    rng = np.random.default_rng(seed)
    nf, nc = len(next(iter(fp.values()))), len(next(iter(ctrl.values())))
    diffs = [first_failure_tprime(fp, rng.integers(0, nf, nf)) - first_failure_tprime(ctrl, rng.integers(0, nc, nc))
             for _ in range(n_boot)]
    return {"difference": first_failure_tprime(fp) - first_failure_tprime(ctrl),
            "ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))],
            "interval": f"95% percentile bootstrap over noise seeds ({n_boot} resamples, {nf} and {nc} seeds)"}


def samples_needed(p: float, level: float = 0.95) -> int:
    """Free samples with zero carriers needed for the exact upper bound on the carrier rate to reach ``p``."""
    a = (1 - level) / 2
    return int(math.ceil(math.log(a) / math.log1p(-p)))


@torch.no_grad()
def ddim_reconstruct(model: DiffusionModel, data: ImageSet, t: int, seeds: int | list[int], *, full_steps: int = 50,
                     device: torch.device | None = None) -> np.ndarray:
    """Noise ``data``'s images to timestep ``t`` (DDPM forward, noise seeded per seed) and denoise back to 0
    with deterministic DDIM in ~``full_steps * t / T`` steps (at least 2). NCHW in [-1, 1]; with a list of
    seeds, [S, N, C, H, W] from one batched pass."""
    many = isinstance(seeds, list)
    seed_list = seeds if isinstance(seeds, list) else [seeds]
    device = device or next(model.unet.parameters()).device
    keep, labels, prompts = conditioning_for(model, data)
    if len(keep) != len(data):
        raise DataError("the model cannot be conditioned on every fingerprinted image (unknown class)")
    total = int(model.scheduler.config.num_train_timesteps)
    alphas = model.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    x0 = model.encode(torch.from_numpy(np.ascontiguousarray(data.images, np.float32)).to(device))  # latent: VAE
    x0 = x0.repeat(len(seed_list), 1, 1, 1)
    noise = torch.cat([torch.randn((len(data), *x0.shape[1:]), generator=torch.Generator().manual_seed(s * 7_919 + t))
                       for s in seed_list]).to(device)
    a_t = alphas[t]
    x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    n = max(2, math.ceil(full_steps * t / total))
    steps = sorted({int(round(v)) for v in np.linspace(t, 0, n + 1)[:-1]}, reverse=True)
    lab = None if labels is None else torch.from_numpy(np.tile(labels, len(seed_list)))
    cond = model.condition(lab, None if prompts is None else prompts * len(seed_list), device)
    for m in model.modules():
        m.eval()
    for i, cur in enumerate(steps):
        a_cur = alphas[cur]
        a_prev = alphas[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, device=device)
        eps = model.predict_noise(x, torch.full((len(x),), cur, device=device, dtype=torch.long), cond).float()
        x0_hat = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x0_hat = x0_hat.clamp(-1, 1) if model.vae is None else x0_hat  # latents are not bounded
        x = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    out = model.decode(x).clamp(-1, 1).cpu().numpy()
    return out.reshape(len(seed_list), len(data), *out.shape[1:]) if many else out


def model_tprime(model: DiffusionModel, fingerprinted: ImageSet, detect: Detect, *, seeds: int = DEFAULT_SEEDS,
                 full_steps: int = 50, t_max: int | None = None, tol: int | None = None) -> dict[str, Any]:
    """t' of every fingerprinted training image under ``model`` (search over [1, 0.9 T] by default)."""
    total = int(model.scheduler.config.num_train_timesteps)
    t_max = t_max if t_max is not None else int(0.9 * total)

    def reconstruct_seeds(i: int, t: int, seed_list: list[int]) -> np.ndarray:
        return ddim_reconstruct(model, fingerprinted.subset([i]), t, seed_list, full_steps=full_steps)

    out = estimate_tprime(fingerprinted.images, detect=detect, t_max=t_max, reconstruct_seeds=reconstruct_seeds,
                          seeds=seeds, t_min=max(1, total // 100), tol=tol)
    out["num_train_timesteps"] = total
    out["t_prime_fraction"] = [t / total for t in out["t_prime"]]
    return out
