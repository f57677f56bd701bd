"""Checks of the filter that do not trust the filter: how many fresh real images of new patients it drops
(a held-out set separate from its calibration null, with a Clopper-Pearson 95% interval), and its recall on
copies of training images it was not built around, each kind with n and a patient-level bootstrap 95%
interval. Aggregates only: nothing per image or per patient leaves this module."""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import binomtest

from privdistill.data.types import ImageSet
from privdistill.filter import FilterCalibration, GalleryScorer
from privdistill.seeds import derive_seed

log = structlog.get_logger(__name__)

MAX_PLANTED = 50  # cases per planted kind
MAX_VISITS = 100  # leave-one-visit-out cases
MAX_HELDOUT = 500  # fresh images the fresh-drop rate is measured on
MIN_CASES, MIN_PATIENTS = 20, 5  # below either, a kind is listed under too_few (its interval says little)
BOOTSTRAP = 1000
TEACHER_T = (0.05, 0.1, 0.2)  # noise levels (fraction of the training timesteps) of the teacher's near-copies
CORRELATED_SIGMA, CORRELATED_STD = 1.5, 0.1


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -1, 1).astype(np.float32)


def plant_copies(train: ImageSet, n: int, seed: int) -> dict[str, np.ndarray]:
    """Exact and near copies (1-px shift, Gaussian noise σ=0.1, contrast ×0.9) of n training images."""
    return {k: v for k, (v, _) in _planted(train, n, seed).items()}


def _planted(train: ImageSet, n: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (images, index of the training image each copies)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train), size=min(n, len(train)), replace=False))
    x = train.images[idx]
    blur_sigma = rng.uniform(0.5, 1.0, len(x))
    white = rng.normal(0, 1, x.shape)
    corr = np.stack([gaussian_filter(w, sigma=(0, CORRELATED_SIGMA, CORRELATED_SIGMA)) for w in white])
    corr *= CORRELATED_STD / corr.reshape(len(x), -1).std(1).clip(1e-8)[:, None, None, None]
    return {
        "exact": (x.copy(), idx),
        "shift_1px": (np.roll(x, shift=1, axis=-1), idx),
        "noise_0.1": (_clip(x + rng.normal(0, 0.1, x.shape)), idx),
        "contrast_0.9": (_clip(x * 0.9), idx),
        "blur_0.5-1px": (_clip(np.stack([gaussian_filter(im, sigma=(0, s, s)) for im, s in zip(x, blur_sigma, strict=True)])), idx),
        "correlated_noise": (_clip(x + corr), idx),
    }


def _homogeneous_class(train: ImageSet, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """σ=0.1 noise copies of images of the most homogeneous class (smallest mean pixel spread)."""
    if train.labels is None or len(np.unique(train.labels)) < 2:
        return np.zeros((0, *train.images.shape[1:]), np.float32), np.zeros(0, np.int64), None
    classes = np.unique(train.labels)
    spread = [train.images[train.labels == c].std(0).mean() for c in classes]
    c = classes[int(np.argmin(spread))]
    members = np.flatnonzero(train.labels == c)
    rng = np.random.default_rng(derive_seed(seed, "filter-audit-homogeneous"))
    idx = np.sort(rng.choice(members, size=min(n, len(members)), replace=False))
    name = train.class_names[int(c)] if train.class_names and int(c) < len(train.class_names) else str(c)
    return _clip(train.images[idx] + rng.normal(0, 0.1, train.images[idx].shape)), idx, name


def local_marks(train: ImageSet, fresh: np.ndarray, n: int, patch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A small patch (``patch`` px square: its most structured one) of a training image pasted, at the same
    place, onto an otherwise fresh image of another patient: (images, index of the training image)."""
    if len(fresh) == 0 or len(train) == 0:
        return np.zeros((0, *train.images.shape[1:]), np.float32), np.zeros(0, np.int64)
    rng = np.random.default_rng(derive_seed(seed, "filter-audit-marks"))
    k = min(n, len(train), len(fresh))
    idx = np.sort(rng.choice(len(train), k, replace=False))
    base = fresh[rng.choice(len(fresh), k, replace=False)].copy()
    h, w = train.images.shape[-2:]
    for j, i in enumerate(idx):
        im = train.images[i]
        best, at = -1.0, (0, 0)
        for y in range(0, h - patch + 1):
            for x in range(0, w - patch + 1):
                v = float(im[:, y : y + patch, x : x + patch].var())
                if v > best:
                    best, at = v, (y, x)
        y, x = at
        base[j, :, y : y + patch, x : x + patch] = im[:, y : y + patch, x : x + patch]
    return base.astype(np.float32), idx


def repeat_visits(train: ImageSet, n: int, seed: int) -> np.ndarray:
    """Training images of patients with several images (one per patient first, then more), for
    leave-one-visit-out: each is scored against the gallery without itself."""
    if train.patient_ids is None:
        return np.zeros(0, np.int64)
    pids, inv, counts = np.unique(train.patient_ids, return_inverse=True, return_counts=True)
    multi = np.flatnonzero(counts[inv] > 1)
    rng = np.random.default_rng(derive_seed(seed, "filter-audit-visits"))
    order = rng.permutation(multi)
    _, first = np.unique(inv[order], return_index=True)  # one visit of each patient before a second one
    ranked = np.concatenate([order[np.sort(first)], np.delete(order, first)])
    return np.sort(ranked[:n])


@torch.no_grad()
def teacher_near_copies(model: Any, train: ImageSet, n: int, seed: int, *, fractions: tuple[float, ...] = TEACHER_T,
                        steps: int = 50) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The teacher's own near-copies: a training image noised to timestep t (a fraction of the training
    timesteps) and DDIM-denoised by the teacher, conditioned on its own label or prompt."""
    from diffusers import DDIMScheduler

    if model.conditioning == "class" and train.labels is None:
        return {}
    if model.conditioning != "class" and train.prompts is None:
        return {}
    rng = np.random.default_rng(derive_seed(seed, "filter-audit-near-copies"))
    idx = np.sort(rng.choice(len(train), size=min(n, len(train)), replace=False))
    device = next(model.unet.parameters()).device
    x0 = model.encode(torch.from_numpy(np.ascontiguousarray(train.images[idx], np.float32)).to(device)).cpu()
    labels = None if train.labels is None else torch.as_tensor(train.labels[idx]).long()
    prompts = None if train.prompts is None else [train.prompts[i] for i in idx]
    for m in model.modules():
        m.eval()
    cond = model.condition(labels, prompts, device)
    total = int(model.scheduler.config.num_train_timesteps)
    g = torch.Generator().manual_seed(derive_seed(seed, "filter-audit-near-noise"))
    out = {}
    for f in fractions:
        sched = DDIMScheduler.from_config(model.scheduler.config)
        sched.set_timesteps(steps)
        t0 = int(round(f * total))
        ts = [t for t in sched.timesteps if int(t) <= t0]
        if not ts:
            continue
        x = sched.add_noise(x0, torch.randn(x0.shape, generator=g), ts[0].reshape(1)).to(device)
        for t in ts:
            eps = model.predict_noise(x, t.to(device).expand(len(x)), cond)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        out[f"teacher_t{f:g}"] = (model.decode(x).clamp(-1, 1).float().cpu().numpy(), idx)
    return out


def flagged(scorer: GalleryScorer, calibration: FilterCalibration, images: np.ndarray,
            exclude: np.ndarray | None = None) -> np.ndarray:
    """Which images the calibrated filter drops (as if enabled)."""
    if len(images) == 0:
        return np.zeros(0, bool)
    scores = scorer.scores(images, calibration.detectors, exclude)
    hit = np.zeros(len(images), bool)
    for d, thr in calibration.thresholds.items():
        hit |= scores[d] > thr
    return hit


def binomial_ci(k: int, n: int) -> list[float] | None:
    """Clopper-Pearson (exact) 95% interval of k successes out of n."""
    if n == 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def patient_bootstrap(hits: np.ndarray, patients: np.ndarray, *, seed: int, n_boot: int = BOOTSTRAP
                      ) -> list[float] | None:
    """Percentile 95% interval of the hit rate, resampling patients (with all their cases) with replacement."""
    if len(hits) == 0:
        return None
    _, inv = np.unique(patients, return_inverse=True)
    n_p = int(inv.max()) + 1
    h = np.bincount(inv, weights=hits.astype(np.float64), minlength=n_p)
    c = np.bincount(inv, minlength=n_p).astype(np.float64)
    draw = np.random.default_rng(seed).integers(0, n_p, (n_boot, n_p))
    rates = h[draw].sum(1) / c[draw].sum(1)
    return [float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))]


def audit_filter(train: ImageSet, fresh: ImageSet, *, scorer: GalleryScorer, calibration: FilterCalibration,
                 seed: int, teacher: Any = None, teacher_train: ImageSet | None = None,
                 local_patch: int | None = None) -> dict[str, Any]:
    """Aggregate rates only. ``fresh``: held-out real images of patients outside the training set and outside
    the calibration null (the fresh-drop audit); ``teacher``: the teacher model, for its near-copies, made from
    ``teacher_train`` (the training set at the teacher's resolution; default ``train``) and resized to the
    resolution of ``train`` (the analysis resolution the filter decides at)."""
    pids = train.patient_ids if train.patient_ids is not None else np.arange(len(train)).astype(str)
    sel = np.random.default_rng(derive_seed(seed, "filter-audit-heldout")).permutation(len(fresh))[:MAX_HELDOUT]
    fresh_imgs = fresh.images[sel]
    fresh_hit = flagged(scorer, calibration, fresh_imgs)
    k, n = int(fresh_hit.sum()), int(len(fresh_hit))

    cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}  # kind -> (images, source, exclude)
    for kind, (imgs, src) in _planted(train, MAX_PLANTED, seed).items():
        cases[kind] = (imgs, src, None)
    visits = repeat_visits(train, MAX_VISITS, seed)
    cases["repeat_visit_lovo"] = (train.images[visits], visits, visits)
    h_imgs, h_src, h_class = _homogeneous_class(train, MAX_PLANTED, seed)
    cases["homogeneous_class"] = (h_imgs, h_src, None)
    patch = local_patch or calibration.local_patch
    m_imgs, m_src = local_marks(train, fresh_imgs, MAX_PLANTED, patch, seed)
    cases["local_mark"] = (m_imgs, m_src, None)
    if teacher is not None:
        from privdistill.imaging import resize_images

        native = teacher_train if teacher_train is not None else train
        for kind, (imgs, src) in teacher_near_copies(teacher, native, MAX_PLANTED, seed).items():
            cases[kind] = (resize_images(imgs, int(train.images.shape[-1])), src, None)

    recall: dict[str, dict[str, Any]] = {}
    too_few: list[str] = []
    for j, (kind, (imgs, src, exclude)) in enumerate(cases.items()):
        hit = flagged(scorer, calibration, imgs, exclude)
        owners = np.asarray(pids)[src] if len(src) else np.zeros(0, str)
        n_pat = int(len(np.unique(owners)))
        recall[kind] = {"value": float(hit.mean()) if len(hit) else None,
                        "ci": patient_bootstrap(hit, owners, seed=derive_seed(seed, "filter-audit-bootstrap", j)), "n": int(len(hit)),
                        "n_patients": n_pat}
        if len(hit) < MIN_CASES or n_pat < MIN_PATIENTS:
            too_few.append(kind)
    out: dict[str, Any] = {
        "fresh_drop_rate": k / n if n else None,
        "fresh_drop_ci": binomial_ci(k, n),
        "fresh_n": n,
        "fresh_dropped": k,
        "alpha": calibration.alpha,
        "recall": recall,
        "too_few": too_few,
        "min_cases": {"n": MIN_CASES, "n_patients": MIN_PATIENTS},
        "homogeneous_class": h_class,
        "interval": "fresh drop: Clopper-Pearson 95%; recall: patient-level bootstrap 95% (percentile, "
                    f"{BOOTSTRAP} resamples)",
        # the four kinds the earlier audit planted, as before (what min_planted_recall policies read)
        "planted_recall": {kd: recall[kd]["value"] for kd in ("exact", "shift_1px", "noise_0.1", "contrast_0.9")},
        "planted_per_kind": recall["exact"]["n"],
        "heldout_real_dropped_rate": k / n if n else None,
        "heldout_real_n": n,
    }
    log.info("filter.audit", fresh_drop_rate=out["fresh_drop_rate"], fresh_n=n, too_few=too_few,
             **{f"recall_{kd}": None if v["value"] is None else round(v["value"], 3) for kd, v in recall.items()})
    return out
