"""LiRA (Carlini et al., "Membership inference attacks from first principles", arXiv 2112.03570) for a
diffusion model, per patient: shadow models are trained on random halves of the patient pool (members
and non-members of the target together), each patient's score under the shadows that saw it (IN) and
those that did not (OUT) is fitted by a Gaussian, and the target's score is tested by the likelihood
ratio. The score is the loss attack's (minus the mean denoising loss at fixed noise, per patient), so
LiRA's gain over it is the per-patient calibration: a patient who is easy to denoise for every model
is no longer mistaken for a member.

Shadows are paired (each pair splits the pool into complementary halves), so every patient is IN for
exactly half of them. With few shadows the variance is pooled over patients ("fixed variance", the
paper's recommendation below 64 shadows). Runs at the site: it trains on real images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import structlog
from scipy.stats import norm

from privdistill.audit.mia import DEFAULT_LEVELS, DEFAULT_SEEDS, denoising_losses, membership_scores
from privdistill.audit.stats import attack_summary
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.models import DiffusionModel
from privdistill.seeds import derive_seed

log = structlog.get_logger(__name__)

TrainShadow = Callable[[ImageSet, int], DiffusionModel]  # (training images, seed) -> trained model


def _pool(members: ImageSet, nonmembers: ImageSet) -> tuple[ImageSet, np.ndarray, np.ndarray, np.ndarray]:
    """(pool images, unit id per image, unit ids, is-member per unit); images without ids are their own unit."""
    def ids(d: ImageSet, tag: str) -> np.ndarray:
        if d.patient_ids is not None:
            return np.array([f"{tag}:{p}" for p in d.patient_ids])
        return np.array([f"{tag}:{i}" for i in range(len(d))])

    uid = np.concatenate([ids(members, "m"), ids(nonmembers, "n")])
    images = np.concatenate([members.images, nonmembers.images])
    labels = None if members.labels is None or nonmembers.labels is None else \
        np.concatenate([members.labels, nonmembers.labels])
    pool = ImageSet(images=images, labels=labels, class_names=list(members.class_names))
    units = np.unique(uid)
    return pool, uid, units, np.array([u.startswith("m:") for u in units])


def unit_scores(model: DiffusionModel, pool: ImageSet, uid: np.ndarray, units: np.ndarray, *,
                levels: tuple[float, ...], seeds: tuple[int, ...]) -> np.ndarray:
    """The loss attack's score of every unit (mean over its images of minus the mean denoising loss)."""
    s = membership_scores(denoising_losses(model, pool, levels=levels, seeds=seeds))
    if not np.isfinite(s).all():
        raise DataError("LiRA: the model cannot be conditioned on every pool image (unknown class)")
    return np.array([s[uid == u].mean() for u in units])


def shadow_halves(n_units: int, n_shadows: int, *, seed: int) -> np.ndarray:
    """bool [n_shadows, n_units]: paired complementary random halves (each unit IN for exactly half)."""
    if n_shadows < 2 or n_shadows % 2:
        raise DataError(f"LiRA needs an even number of shadow models, at least 2 (got {n_shadows})")
    rng = np.random.default_rng([seed, 0x11A])
    rows = []
    for _ in range(n_shadows // 2):
        half = np.zeros(n_units, bool)
        half[rng.permutation(n_units)[: n_units // 2]] = True
        rows += [half, ~half]
    return np.stack(rows)


def likelihood_ratio(target: np.ndarray, shadow: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(online LiRA statistic, offline statistic) per unit. ``shadow`` [S, U] scores, ``inside`` [S, U]."""
    s_in = np.where(inside, shadow, np.nan)
    s_out = np.where(~inside, shadow, np.nan)
    mu_in, mu_out = np.nanmean(s_in, 0), np.nanmean(s_out, 0)
    # fixed (pooled) variance: with few shadows a per-unit variance is too noisy to divide by
    sd_in = float(np.sqrt(np.nanmean((s_in - mu_in) ** 2))) or 1e-12
    sd_out = float(np.sqrt(np.nanmean((s_out - mu_out) ** 2))) or 1e-12
    online = norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)
    offline = (target - mu_out) / sd_out  # one-sided: how far above what non-members score
    return online, offline


def lira_attack(target: DiffusionModel, members: ImageSet, nonmembers: ImageSet, *, train_shadow: TrainShadow,
                n_shadows: int = 4, seed: int = 0, levels: tuple[float, ...] = DEFAULT_LEVELS,
                seeds: tuple[int, ...] = DEFAULT_SEEDS) -> dict[str, Any]:
    """LiRA of ``target`` (trained on ``members``) against ``nonmembers``, with ``n_shadows`` shadows
    from ``train_shadow``; aggregates only (AUC with patient-level 95% interval, TPR at low FPR, n)."""
    pool, uid, units, is_member = _pool(members, nonmembers)
    inside = shadow_halves(len(units), n_shadows, seed=seed)
    shadow = np.empty((n_shadows, len(units)))
    for k in range(n_shadows):
        take = np.flatnonzero(np.isin(uid, units[inside[k]]))
        model = train_shadow(pool.subset(take), derive_seed(seed, "lira-shadow", k))
        shadow[k] = unit_scores(model, pool, uid, units, levels=levels, seeds=seeds)
        log.info("lira.shadow", k=k, n_units_in=int(inside[k].sum()))
    target_scores = unit_scores(target, pool, uid, units, levels=levels, seeds=seeds)
    online, offline = likelihood_ratio(target_scores, shadow, inside)
    out: dict[str, Any] = {
        "attack": f"LiRA (Carlini et al. 2022), {n_shadows} shadow models on paired random halves of the "
                  f"{len(units)}-patient pool, fixed variance; score = minus the mean denoising loss per patient",
        "n_shadows": n_shadows,
        "online": attack_summary(online[is_member], online[~is_member], member_groups=None, nonmember_groups=None,
                                 seed=seed),
        "offline": attack_summary(offline[is_member], offline[~is_member], member_groups=None, nonmember_groups=None,
                                  seed=seed),
        "loss_attack_same_units": attack_summary(target_scores[is_member], target_scores[~is_member],
                                                 member_groups=None, nonmember_groups=None, seed=seed),
        "dp_covered": False,
    }
    for key in ("online", "offline", "loss_attack_same_units"):
        out[key]["unit"] = "patient" if members.patient_ids is not None else "image"
    log.info("lira.done", auc=round(out["online"]["auc"], 4), auc_ci95=out["online"]["auc_ci95"],
             n_member_units=int(is_member.sum()), n_nonmember_units=int((~is_member).sum()))
    return out
