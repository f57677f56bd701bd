"""The fingerprint detector: a small CNN that says whether an image carries one of the planted
fingerprints, trained on training images with and without them (noise and faded markers included,
so denoised reconstructions and samples are judged like clean copies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import nn

from privdistill.audit.fingerprints import Fingerprint, Kind
from privdistill.errors import DataError
from privdistill.seeds import derive_seed

log = structlog.get_logger(__name__)


class _Net(nn.Module):
    """Position-aware: a fingerprint is a marker of a known look at a known place, so the head sees the
    whole feature map (no global pooling that would let texture anywhere pass for a marker)."""

    def __init__(self, channels: int, height: int, width: int, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(hidden * height * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1)).squeeze(1)


@dataclass
class FingerprintDetector:
    net: nn.Module
    threshold: float = 0.9  # a fingerprint must be clear: texture in a poor sample is not one

    @torch.no_grad()
    def probability(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        self.net.eval()
        out = [torch.sigmoid(self.net(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size], np.float32))))
               for s in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def detect(self, images: np.ndarray) -> np.ndarray:
        """bool [N]: the image carries a planted fingerprint."""
        return self.probability(images) >= self.threshold


def with_random_fingerprints(images: np.ndarray, fingerprints: list[Fingerprint], rng: np.random.Generator,
                             strength: tuple[float, float] = (0.6, 1.0)) -> np.ndarray:
    """Each image with one fingerprint drawn from ``fingerprints``, at a random opacity in ``strength``."""
    out = np.empty_like(images)
    which = rng.integers(0, len(fingerprints), len(images))
    alpha = rng.uniform(*strength, len(images)).astype(np.float32)
    for i, fp in enumerate(fingerprints):
        sel = np.flatnonzero(which == i)
        if len(sel):
            out[sel] = fp.apply(images[sel], alpha[sel])
    return out


def decoys(images: np.ndarray, fingerprints: list[Fingerprint], rng: np.random.Generator) -> np.ndarray:
    """Negatives that look like markers but are not the planted ones: a circle or patch of another
    texture at a random place at least 2 px away from every planted fingerprint."""
    _, _, h, w = images.shape
    size = fingerprints[0].size
    taken = [(fp.y, fp.x) for fp in fingerprints]
    out = np.empty_like(images)
    for i in range(len(images)):
        for _ in range(20):
            y, x = int(rng.integers(0, h - size - 1)), int(rng.integers(0, w - size - 1))
            if all(abs(y - ty) > 2 or abs(x - tx) > 2 for ty, tx in taken):
                break
        kind: Kind = "circle" if rng.random() < 0.5 else "patch"
        fake = Fingerprint(kind, y, x, size, int(rng.integers(1 << 30)))
        out[i] = fake.apply(images[i : i + 1], float(rng.uniform(0.6, 1.0)))[0]
    return out


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sampler-like residual noise, white or blotchy (white noise box-blurred over 2-3 px), of sigma up
    to 0.5 for half the images and mild for the rest, plus a gain change; the same for both classes, so
    noisy, textured samples are judged on the marker and not on the noise."""
    n = len(x)
    heavy = rng.random((n, 1, 1, 1)) < 0.5
    sigma = np.where(heavy, rng.uniform(0.1, 0.5, (n, 1, 1, 1)), rng.uniform(0, 0.1, (n, 1, 1, 1)))
    noise = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    blotchy = noise.clone()
    for k in (2, 3):
        sel = torch.from_numpy(rng.random(n) < 0.33)
        if sel.any():
            b = F.avg_pool2d(F.pad(noise[sel], (0, k - 1, 0, k - 1), mode="replicate"), k, stride=1)
            blotchy[sel] = b / b.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    gain = rng.uniform(0.85, 1.15, (n, 1, 1, 1))
    noisy = (x + 1) * gain - 1 + sigma * blotchy.numpy()
    return np.clip(noisy, -1, 1).astype(np.float32)


def train_detector(clean: np.ndarray, fingerprints: list[Fingerprint], *, steps: int = 400, batch_size: int = 64,
                   learning_rate: float = 2e-3, seed: int = 0) -> FingerprintDetector:
    """Half of every batch carries a planted fingerprint (a random one of ``fingerprints``); the other half
    is clean or carries a decoy marker. Noise and gain augmentation on both halves."""
    if len(clean) < 2 or not fingerprints:
        raise DataError("the fingerprint detector needs at least two clean images and one fingerprint")
    rng = np.random.default_rng(derive_seed(seed, "fingerprint-detector"))
    _, c, h, w = clean.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Net(c, h, w)
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    half = max(2, batch_size // 2)
    net.train()
    loss = torch.zeros(())
    for _ in range(steps):
        pos = with_random_fingerprints(clean[rng.integers(0, len(clean), half)], fingerprints, rng)
        neg = clean[rng.integers(0, len(clean), half)]
        n_decoy = half // 2
        neg[:n_decoy] = decoys(neg[:n_decoy], fingerprints, rng)
        x = torch.from_numpy(_augment(np.concatenate([pos, neg]), rng))
        y = torch.cat([torch.ones(half), torch.zeros(half)])
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    log.info("fingerprint.detector_trained", steps=steps, final_loss=round(float(loss.detach()), 4))
    return FingerprintDetector(net)


def detector_accuracy(det: FingerprintDetector, clean: np.ndarray, fingerprints: list[Fingerprint], *,
                      seed: int = 0) -> dict[str, Any]:
    """Accuracy on ``clean`` images (ideally held out) and the same images fingerprinted at full opacity."""
    rng = np.random.default_rng([seed, 0xACC])
    pos = det.detect(with_random_fingerprints(clean, fingerprints, rng, strength=(1.0, 1.0)))
    neg = det.detect(clean)
    return {"n": int(2 * len(clean)), "true_positive_rate": float(pos.mean()),
            "true_negative_rate": float(1 - neg.mean()),
            "accuracy": float((pos.sum() + (~neg).sum()) / (2 * len(clean)))}
