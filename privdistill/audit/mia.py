"""Loss-based membership inference: a model denoises its training images with lower loss than unseen
images of the same distribution; the ROC AUC of that test (0.5 = no leak) measures membership leakage.

Needs real images, so it runs where they are (the site). Only the aggregate in ``membership_auc``'s
result may leave it: never per-image scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F

from privdistill.audit.stats import attack_summary
from privdistill.config import DataConfig, VisitsConfig
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.models import DiffusionModel
from privdistill.seeds import derive_seed
from privdistill.workdir import DATA_REPORT, TEST_SET, TRAIN_SET

log = structlog.get_logger(__name__)

# noise levels as fractions of the training timesteps: the loss gap between members and non-members
# is largest at low to middle noise, where the model must reproduce image detail
DEFAULT_LEVELS = (0.02, 0.05, 0.1, 0.2, 0.4)
DEFAULT_SEEDS = (0, 1)
MAX_PER_CLASS = 200


def conditioning_for(model: DiffusionModel, data: ImageSet) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """(indices of images the model can be conditioned on, their labels in the model's index space, prompts)."""
    if model.conditioning == "text":
        if data.prompts is None:
            raise DataError("a text-conditioned model needs the images' prompts for membership inference")
        return np.arange(len(data)), None, list(data.prompts)
    if data.labels is None:
        if len(model.class_names) > 1:
            raise DataError("a class-conditioned model needs the images' labels for membership inference")
        return np.arange(len(data)), np.zeros(len(data), np.int64), None
    index = {name: i for i, name in enumerate(model.class_names)}
    mapped = np.array([index.get(data.class_names[int(lab)], -1) for lab in data.labels], np.int64)
    keep = np.flatnonzero(mapped >= 0)
    return keep, mapped[keep], None


def timesteps_for(model: DiffusionModel, levels: tuple[float, ...]) -> list[int]:
    total = int(model.scheduler.config.num_train_timesteps)
    return [min(total - 1, max(0, int(round(f * (total - 1))))) for f in levels]


@torch.no_grad()
def denoising_losses(
    model: DiffusionModel, data: ImageSet, *, levels: tuple[float, ...] = DEFAULT_LEVELS,
    seeds: tuple[int, ...] = DEFAULT_SEEDS, batch_size: int = 256, device: torch.device | None = None,
) -> np.ndarray:
    """[N, len(levels) * len(seeds)] epsilon-prediction MSE of every image at fixed noise levels.

    For each (level, seed) ONE noise image is drawn and used for every image, so two images' losses
    differ only by how well the model knows them. Images the model cannot be conditioned on (a class
    it does not know) get NaN rows."""
    device = device or next(model.unet.parameters()).device
    keep, labels, prompts = conditioning_for(model, data)
    ts = timesteps_for(model, levels)
    shape = model.sample_shape  # a latent model: the loss is measured on VAE latents
    noises = [torch.randn(shape, generator=torch.Generator().manual_seed(1_000_003 * s + 7919 * j))
              for s in seeds for j in range(len(ts))]
    out = np.full((len(data), len(noises)), np.nan, np.float32)
    for m in model.modules():
        m.eval()
    for s in range(0, len(keep), batch_size):
        idx = keep[s : s + batch_size]
        x0 = model.encode(torch.from_numpy(np.ascontiguousarray(data.images[idx], dtype=np.float32)).to(device))
        lab = None if labels is None else torch.from_numpy(labels[s : s + batch_size])
        cond = model.condition(lab, None if prompts is None else [prompts[i] for i in idx], device)
        for k, noise in enumerate(noises):
            t = torch.full((len(idx),), ts[k % len(ts)], dtype=torch.long, device=device)
            eps = noise.to(device).expand(len(idx), *shape)
            pred = model.predict_noise(model.scheduler.add_noise(x0, eps, t), t, cond)
            out[idx, k] = F.mse_loss(pred.float(), eps, reduction="none").flatten(1).mean(1).cpu().numpy()
    return out


def membership_scores(losses: np.ndarray) -> np.ndarray:
    """Attack score per image: minus its mean denoising loss (members should score higher)."""
    return -np.nanmean(losses, axis=1)


def balanced(members: ImageSet, nonmembers: ImageSet, *, max_per_class: int = MAX_PER_CLASS,
             seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Equal numbers of members and non-members per class name (at most ``max_per_class`` each), so a
    class that is merely easier to denoise cannot pass for membership."""
    rng = np.random.default_rng(seed)

    def by_class(d: ImageSet) -> dict[str, np.ndarray]:
        if d.labels is None:
            return {"": np.arange(len(d))}
        names = np.asarray(d.class_names)[d.labels]
        return {n: np.flatnonzero(names == n) for n in np.unique(names)}

    a, b = by_class(members), by_class(nonmembers)
    take_a, take_b = [], []
    for name in sorted(set(a) & set(b)):
        n = min(len(a[name]), len(b[name]), max_per_class)
        take_a.append(rng.permutation(a[name])[:n])
        take_b.append(rng.permutation(b[name])[:n])
    if not take_a or sum(map(len, take_a)) == 0:
        raise DataError("membership inference needs members and non-members of at least one common class")
    return members.subset(np.sort(np.concatenate(take_a))), nonmembers.subset(np.sort(np.concatenate(take_b)))


def comparable_nonmembers(test: ImageSet, visits: VisitsConfig | None, *, seed: int) -> ImageSet:
    """The held-out set processed like the training set: where the loader simulated visits on the training
    split only (shift, rotation, gain), each held-out image gets one such visit too, so the attack sees
    the same perturbations on both sides and measures membership, not preprocessing."""
    if visits is None or len(test) == 0:
        return test
    from privdistill.data.visits import apply_visits

    return apply_visits(test, visits.model_copy(update={"count": 1}), seed=derive_seed(seed, "mia-test-visits"))


def ingest_visits(data_cfg: DataConfig, ingest_dir: Path) -> VisitsConfig | None:
    """The visits the ingest stage in ``ingest_dir`` applied to its training split (None if none)."""
    report = ingest_dir / DATA_REPORT
    applied = report.is_file() and json.loads(report.read_text()).get("visits_per_patient") is not None
    return data_cfg.visits if applied else None


def membership_auc(
    model: DiffusionModel, members: ImageSet, nonmembers: ImageSet, *, max_per_class: int = MAX_PER_CLASS,
    levels: tuple[float, ...] = DEFAULT_LEVELS, seeds: tuple[int, ...] = DEFAULT_SEEDS, seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """ROC AUC of the loss attack separating ``members`` (training images) from ``nonmembers`` (held out),
    on class-balanced subsets: per patient (images carry patient ids) with a patient-level bootstrap 95%
    interval, TPR at 1% / 0.1% FPR where the non-member count allows (``stats.attack_summary``), every
    number with its n. Aggregates only: no per-image score is returned."""
    mem, non = balanced(members, nonmembers, max_per_class=max_per_class, seed=seed)
    lm = denoising_losses(model, mem, levels=levels, seeds=seeds, device=device)
    ln = denoising_losses(model, non, levels=levels, seeds=seeds, device=device)
    ok_m, ok_n = np.isfinite(lm).all(1), np.isfinite(ln).all(1)
    if not ok_m.any() or not ok_n.any():
        raise DataError("membership inference: the model knows none of the images' classes")
    sm, sn = membership_scores(lm[ok_m]), membership_scores(ln[ok_n])
    summary = attack_summary(sm, sn, member_groups=None if mem.patient_ids is None else mem.patient_ids[ok_m],
                             nonmember_groups=None if non.patient_ids is None else non.patient_ids[ok_n], seed=seed)
    result = {
        **summary,
        "n_members": int(ok_m.sum()),
        "n_nonmembers": int(ok_n.sum()),
        "member_loss_mean": float(lm[ok_m].mean()),
        "nonmember_loss_mean": float(ln[ok_n].mean()),
        "timesteps": timesteps_for(model, levels),
        "noise_seeds": list(seeds),
        "attack": "loss: minus the mean epsilon-prediction MSE over fixed noise levels and fixed noise, "
                  "averaged over each patient's images",
        "dp_covered": False,  # computed on the real patients outside any DP accountant
    }
    auc = result["auc"]
    log.info("mia.done", auc=round(auc, 4), auc_ci95=[round(x, 4) for x in result["auc_ci95"]], unit=result["unit"],
             n_member_units=result["n_member_units"], n_nonmember_units=result["n_nonmember_units"])
    return result


def run_membership_audit(model: DiffusionModel, ingest_dir: Path, data_cfg: DataConfig, *, seed: int) -> dict[str, Any]:
    """``membership_auc`` of ``model`` with the ingest stage's training split as members and its held-out
    split (given the training split's simulated visits) as non-members; ``auc`` None when no held-out set."""
    train = ImageSet.load(ingest_dir / TRAIN_SET)
    test = ImageSet.load(ingest_dir / TEST_SET)
    if len(test) == 0:
        return {"auc": None, "reason": "no held-out real images (data.test_source / data.test_fraction)"}
    nonmembers = comparable_nonmembers(test, ingest_visits(data_cfg, ingest_dir), seed=seed)
    return membership_auc(model, train, nonmembers, seed=seed)
