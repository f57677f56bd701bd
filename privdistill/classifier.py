"""A small GroupNorm CNN classifier for downstream accuracy (TSTR/TRTR) and domain FID features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import structlog
import torch
from torch import nn

log = structlog.get_logger(__name__)

FEATURE_DIM = 128


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(in_channels, width, 2),
            *block(width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, FEATURE_DIM),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Classifier:
    model: SmallCNN
    n_classes: int


def _random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light augmentation: each image rolled by up to one pixel in each direction."""
    shifts = torch.randint(-1, 2, (len(x), 2), generator=g)
    return torch.stack([torch.roll(img, (int(dy), int(dx)), (1, 2)) for img, (dy, dx) in zip(x, shifts, strict=True)])


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float = 2e-3,
    augment: bool = True,
) -> Classifier:
    """Train from scratch with Adam; deterministic on CPU for a given seed (global RNG untouched)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(x.shape[1], n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=g)
        xb = _random_shift(x[idx], g) if augment else x[idx]
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.debug("classifier.step", step=step, loss=loss.item())
    model.eval()
    return Classifier(model=model, n_classes=n_classes)


@torch.no_grad()
def _batched(fn: nn.Module, images: np.ndarray, batch: int = 1024) -> torch.Tensor:
    outs = [
        fn(torch.from_numpy(np.ascontiguousarray(images[s : s + batch], dtype=np.float32)))
        for s in range(0, len(images), batch)
    ]
    return torch.cat(outs) if outs else torch.zeros(0)


def predict(clf: Classifier, images: np.ndarray) -> np.ndarray:
    """Predicted class index per image."""
    return _batched(clf.model, images).argmax(1).numpy()


def accuracy(clf: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose predicted class equals the label."""
    if len(images) == 0:
        return 0.0
    return float((predict(clf, images) == np.asarray(labels)).mean())


def features(clf: Classifier, images: np.ndarray) -> np.ndarray:
    """Penultimate-layer activations [N, FEATURE_DIM] (float32), e.g. for `metrics.fid_domain`."""
    return _batched(clf.model.body, images).numpy().astype(np.float32).reshape(len(images), -1)
