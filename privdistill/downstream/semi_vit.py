"""Semi-ViT training (after Cai et al., "Semi-supervised Vision Transformers at Scale", NeurIPS 2022):
supervised fine-tuning of a ViT on the labelled images, then semi-supervised fine-tuning in which an EMA
teacher pseudo-labels unlabelled images (kept above a confidence threshold) and the student learns from
strongly augmented, probabilistically pseudo-mixed versions of them. The paper's first stage,
self-supervised (MAE) pre-training, is not done: the ViT starts from random weights.

Probabilistic pseudo-mixup, as we implement it: two kept unlabelled images i, j (a random pairing) with
confidences s_i, s_j and a ratio lam ~ Beta(alpha, alpha) are mixed with lam' = lam*s_i / (lam*s_i +
(1-lam)*s_j), the same lam' for the images and for their one-hot pseudo-labels, so the more confident
image dominates both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from privdistill.config import DownstreamConfig
from privdistill.downstream import augment
from privdistill.downstream.vit import ViTClassifier

log = structlog.get_logger(__name__)


@dataclass
class Trained:
    """The trained classifier (the EMA teacher after the semi-supervised stage) and what training saw."""

    model: nn.Module
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Streams:
    """Independent random streams, one per use, from one seed (numpy SeedSequence.spawn)."""

    init: int
    batches: torch.Generator
    mixup: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> _Streams:
        init, batches, mixup = np.random.SeedSequence(seed).spawn(3)
        return cls(
            init=int(init.generate_state(1)[0]),
            batches=torch.Generator().manual_seed(int(batches.generate_state(1)[0])),
            mixup=np.random.default_rng(mixup),
        )


def split_labelled(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the labelled and the unlabelled images: per class round(fraction * n), at least one."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    lab = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(len(members), max(1, int(round(fraction * len(members)))))
        lab.append(rng.choice(members, k, replace=False))
    labelled = np.sort(np.concatenate(lab)) if lab else np.zeros(0, dtype=np.int64)
    return labelled, np.setdiff1d(np.arange(len(labels)), labelled)


def _optimizer(model: nn.Module, cfg: DownstreamConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, steps // 2), steps)


def _labelled_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DownstreamConfig,
                   s: _Streams) -> torch.Tensor:
    idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=s.batches)
    return F.cross_entropy(model(augment.weak(x[idx], s.batches)), y[idx])


def _pseudo_mixup(x: torch.Tensor, conf: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, alpha: float,
                  s: _Streams) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilistic pseudo-mixup of the kept images among themselves. The random draws do not depend on
    how many images are kept, so the other streams (labelled batches) never see the unlabelled data."""
    order = torch.argsort(torch.rand(len(x), generator=s.batches)[keep])
    lam = float(s.mixup.beta(alpha, alpha)) if alpha > 0 else 1.0
    x, conf, y = x[keep], conf[keep], y[keep]
    if alpha <= 0 or len(x) < 2:
        return x, y
    w = lam * conf / (lam * conf + (1 - lam) * conf[order])
    return w.view(-1, 1, 1, 1) * x + (1 - w.view(-1, 1, 1, 1)) * x[order], w[:, None] * y + (1 - w[:, None]) * y[order]


@torch.no_grad()
def _ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
        pt.mul_(decay).add_(ps.detach(), alpha=1 - decay)


def train_vit(
    labelled: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    cfg: DownstreamConfig,
    *,
    seed: int,
    unlabelled: np.ndarray | None = None,
    unlabelled_truth: np.ndarray | None = None,
) -> Trained:
    """Supervised ViT on ``labelled``; with ``unlabelled`` (and cfg.semi_steps) also the Semi-ViT stage.

    Deterministic on CPU for a seed; the global torch RNG is left untouched. ``unlabelled_truth``, if
    given, is used only to report the accuracy of the accepted pseudo-labels, never for training.
    """
    if len(labelled) == 0:
        raise ValueError("the ViT needs at least one labelled image")
    x = torch.from_numpy(np.ascontiguousarray(labelled, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    s = _Streams.from_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.init)
        model = ViTClassifier(x.shape[-1], x.shape[1], n_classes, cfg.vit)
    stats: dict[str, Any] = {"n_labelled": len(x), "n_unlabelled": 0 if unlabelled is None else len(unlabelled)}

    model.train()
    opt, sched = _optimizer(model, cfg, cfg.supervised_steps)
    for step in range(cfg.supervised_steps):
        loss = _labelled_loss(model, x, y, cfg, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.debug("vit.supervised", step=step, loss=loss.item())
    if unlabelled is None or len(unlabelled) == 0:
        model.eval()
        return Trained(model, stats)

    u = torch.from_numpy(np.ascontiguousarray(unlabelled, dtype=np.float32))
    truth = None if unlabelled_truth is None else torch.from_numpy(np.asarray(unlabelled_truth, dtype=np.int64))
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt, sched = _optimizer(model, cfg, cfg.semi_steps)
    accepted = seen = correct = 0
    for step in range(cfg.semi_steps):
        sup = _labelled_loss(model, x, y, cfg, s)
        idx = torch.randint(0, len(u), (cfg.unlabelled_ratio * cfg.batch_size,), generator=s.batches)
        with torch.no_grad():
            conf, pseudo = F.softmax(teacher(augment.weak(u[idx], s.batches)), dim=1).max(dim=1)
        keep = conf >= cfg.confidence_threshold
        seen += len(idx)
        accepted += int(keep.sum())
        if truth is not None:
            correct += int((pseudo[keep] == truth[idx][keep]).sum())
        xu, yu = _pseudo_mixup(augment.strong(u[idx], s.batches), conf, F.one_hot(pseudo, n_classes).float(),
                               keep, cfg.mixup_alpha, s)
        unsup = torch.zeros(())
        if len(xu):  # summed over the kept images, divided by the whole unlabelled batch (as in FixMatch)
            unsup = -(yu * F.log_softmax(model(xu), dim=1)).sum() / len(idx)
        loss = sup + cfg.unlabelled_weight * unsup
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _ema_update(teacher, model, cfg.ema_decay)
        if step % 100 == 0:
            log.debug("vit.semi", step=step, sup=sup.item(), unsup=float(unsup.detach()), accepted=int(keep.sum()))
    stats["pseudo_label_rate"] = accepted / seen
    stats["pseudo_labels_used"] = accepted
    if truth is not None:
        stats["pseudo_label_accuracy"] = correct / accepted if accepted else None
    return Trained(teacher.eval(), stats)
