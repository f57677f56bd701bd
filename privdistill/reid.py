"""Patient re-identification: a contrastive embedding CNN, its threshold calibration, ONNX export and runtime."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from privdistill.audit.roc import roc_auc
from privdistill.config import ReidConfig
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.logs import progress_enabled
from privdistill.seeds import derive_seed

log = structlog.get_logger(__name__)

ARCHS = ("convnet", "resnet")
POOL = 2  # spatial grid kept before the embedding head (layout matters for "same patient")
MAX_CAL_PAIRS = 4000
PAIR_TARGET_TPR = 0.95
WEIGHTS_FILE, CONFIG_FILE = "reid.pt", "reid.json"


def _norm(ch: int) -> nn.GroupNorm:
    groups = math.gcd(ch, 8)
    return nn.GroupNorm(groups, ch)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.SiLU())


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _norm(cout),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.body(x) + self.skip(x))


class ReidNet(nn.Module):
    """Image -> L2-normalised embedding. Three stride-2 stages, GroupNorm only (Opacus-safe), any resolution."""

    def __init__(self, arch: str = "convnet", channels: int = 1, embedding_dim: int = 64, width: int = 32) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown re-identification architecture {arch!r}; choose one of {ARCHS}")
        self.arch, self.channels, self.embedding_dim, self.width = arch, channels, embedding_dim, width
        w = width
        if arch == "convnet":
            self.features = nn.Sequential(
                _conv(channels, w), _conv(w, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w), _conv(2 * w, 4 * w, 2)
            )
        else:
            self.features = nn.Sequential(
                _conv(channels, w), _ResBlock(w, w, 2), _ResBlock(w, 2 * w, 2), _ResBlock(2 * w, 4 * w, 2)
            )
        self.pool = nn.AdaptiveAvgPool2d(POOL)
        self.head = nn.Linear(4 * w * POOL * POOL, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        pad_h, pad_w = int(h.shape[-2]) % POOL, int(h.shape[-1]) % POOL
        if pad_h or pad_w:  # keeps the pooling an exact (ONNX-exportable) average pool
            h = F.pad(h, (0, pad_w, 0, pad_h), mode="replicate")
        return F.normalize(self.head(self.pool(h).flatten(1)), dim=1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A re-acquisition / near-copy: shift <= 1.5 px, rotation <= 4 deg, scale +-3%, contrast, brightness, noise."""
    n, _, h, w = x.shape

    def u(*shape: int) -> torch.Tensor:  # uniform in [-1, 1]
        return torch.rand(*shape, generator=gen) * 2 - 1

    ang, scale = u(n) * math.radians(4.0), 1 + 0.03 * u(n)
    tx, ty = u(n) * 1.5 * 2 / w, u(n) * 1.5 * 2 / h
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = mean + (y - mean) * (1 + 0.15 * u(n, 1, 1, 1)) + 0.1 * u(n, 1, 1, 1)
    y = y + torch.randn(y.shape, generator=gen) * (0.12 * torch.rand(n, 1, 1, 1, generator=gen))
    return y.clamp(-1, 1)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive (InfoNCE with several positives) loss over normalised embeddings."""
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1).clamp_min(1)).mean()


@dataclass
class ReidModel:
    """A trained re-identification network with its decision threshold and calibration report."""

    net: ReidNet
    cfg: ReidConfig
    threshold: float
    calibration: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    resolution: int = 28

    @property
    def arch(self) -> str:
        return self.net.arch

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """NCHW [-1, 1] -> [N, D] float32 normalised embeddings (torch, eval mode); images of another size
        are resized to the one the network was trained at (the analysis resolution)."""
        from privdistill.imaging import resize_images

        images = resize_images(images, self.resolution)
        self.net.eval()
        out = [self.net(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size], np.float32))).numpy()
               for s in range(0, len(images), batch_size)]  # fmt: skip
        return np.concatenate(out) if out else np.zeros((0, self.net.embedding_dim), np.float32)


def _patient_groups(ids: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def _split_patients(images: ImageSet, fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    ids = images.patient_ids if images.patient_ids is not None else np.arange(len(images)).astype(str)
    groups = _patient_groups(np.asarray(ids))
    if len(groups) < 4:
        raise DataError(f"re-identification needs at least 4 patients, got {len(groups)}")
    order = np.random.default_rng(seed).permutation(len(groups))
    n_cal = min(len(groups) - 2, max(2, round(fraction * len(groups))))
    return [groups[i] for i in order[n_cal:]], [groups[i] for i in order[:n_cal]]


def train_reid(train: ImageSet, cfg: ReidConfig, *, seed: int, arch: str = "convnet",
               target_tpr: float = PAIR_TARGET_TPR) -> ReidModel:
    """Train a patient re-identification embedding (SupCon on repeat visits / augmentations), then calibrate
    its pair threshold at ``target_tpr`` (a diagnostic and the independent evaluation's operating point; the
    privacy filter calibrates its own thresholds on fresh images, privdistill.filter.calibrate_filter)."""
    fit_groups, cal_groups = _split_patients(train, cfg.calibration_fraction, seed)
    images = torch.from_numpy(np.ascontiguousarray(train.images, np.float32))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReidNet(arch, images.shape[1], cfg.embedding_dim, cfg.width)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    per_batch = max(2, cfg.batch_size // 2)
    log.info("reid.train.start", arch=arch, steps=cfg.steps, n_patients=len(fit_groups), n_images=len(train))
    net.train()
    bar = tqdm(range(cfg.steps), desc=f"reid[{arch}]", disable=not progress_enabled(), leave=False)
    for step in bar:
        chosen = rng.choice(len(fit_groups), per_batch, replace=per_batch > len(fit_groups))
        first, second = [], []
        for g in (fit_groups[c] for c in chosen):
            pair = rng.choice(g, 2, replace=False) if len(g) > 1 else (g[0], g[0])
            first.append(pair[0])
            second.append(pair[1])
        x = augment(images[np.concatenate([first, second])], gen)
        labels = torch.from_numpy(np.concatenate([chosen, chosen]))
        loss = supcon_loss(net(x), labels, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % max(1, cfg.steps // 5) == 0:
            log.info("reid.train.progress", step=step + 1, loss=round(loss.item(), 4))
    net.eval()
    model = ReidModel(net=net, cfg=cfg, threshold=1.0, seed=seed, resolution=int(images.shape[-1]))
    model.calibration = calibrate(model, train, cal_groups, seed=seed, target_tpr=target_tpr)
    model.threshold = model.calibration["threshold"]
    log.info("reid.calibrated", arch=arch, **model.calibration)
    return model


def distinct_pairs(owner: np.ndarray, *, same: bool, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``limit`` distinct unordered pairs (i < j) of positions whose owners are equal (``same``) or
    differ, drawn without replacement: [K, 2] int64."""
    n = len(owner)
    if n * (n - 1) // 2 > 50 * limit and not same:  # too many to list: distinct random pairs, deduplicated
        found = np.zeros(0, np.int64)
        for _ in range(100):
            a, b = rng.integers(0, n, (2, 4 * limit))
            ok = (a != b) & (owner[a] != owner[b])
            lo, hi = np.minimum(a, b)[ok], np.maximum(a, b)[ok]
            found = np.unique(np.concatenate([found, lo * n + hi]))
            if len(found) >= limit:
                break
        found = rng.permutation(found)[:limit]
        return np.stack([found // n, found % n], 1).astype(np.int64)
    i, j = np.triu_indices(n, k=1)
    keep = (owner[i] == owner[j]) if same else (owner[i] != owner[j])
    pairs = np.stack([i[keep], j[keep]], 1).astype(np.int64)
    if len(pairs) > limit:
        pairs = pairs[np.sort(rng.choice(len(pairs), limit, replace=False))]
    return pairs


@torch.no_grad()
def calibrate(model: ReidModel, data: ImageSet, groups: list[np.ndarray], *, seed: int,
              target_tpr: float = PAIR_TARGET_TPR) -> dict[str, float]:
    """Threshold at which ``target_tpr`` of held-out same-patient pairs match; TPR/FPR/AUC on those pairs.

    Pairs are distinct (no pair counted twice, drawn without replacement); n_pos / n_neg count them."""
    rng = np.random.default_rng(derive_seed(seed, "reid-pairs"))
    gen = torch.Generator().manual_seed(derive_seed(seed, "reid-pairs"))
    idx = np.concatenate(groups)
    emb = model.embed(data.images[idx]).astype(np.float64)
    owner = np.concatenate([np.full(len(g), k) for k, g in enumerate(groups)])
    pp = distinct_pairs(owner, same=True, limit=MAX_CAL_PAIRS, rng=rng)
    pos = list((emb[pp[:, 0]] * emb[pp[:, 1]]).sum(1))
    singles = [k for k, g in enumerate(groups) if len(g) == 1]
    if singles:  # one image only: the positive is a re-acquisition-like augmentation of it
        where = np.array([int(np.flatnonzero(owner == k)[0]) for k in singles])
        aug = model.embed(augment(torch.from_numpy(data.images[idx[where]]), gen).numpy()).astype(np.float64)
        pos.extend((aug * emb[where]).sum(1))
    pos_arr = np.asarray(pos, np.float64)
    if len(pos_arr) > MAX_CAL_PAIRS:
        pos_arr = rng.choice(pos_arr, MAX_CAL_PAIRS, replace=False)
    nn_ = distinct_pairs(owner, same=False, limit=MAX_CAL_PAIRS, rng=rng)
    neg_arr = (emb[nn_[:, 0]] * emb[nn_[:, 1]]).sum(1)
    k = int(math.floor((1 - target_tpr) * len(pos_arr)))
    threshold = float(np.sort(pos_arr)[min(k, len(pos_arr) - 1)])
    return {
        "threshold": threshold,
        "target_tpr": float(target_tpr),
        "tpr": float((pos_arr >= threshold).mean()),
        "fpr": float((neg_arr >= threshold).mean()) if len(neg_arr) else float("nan"),
        "auc": roc_auc(pos_arr, neg_arr) if len(neg_arr) else float("nan"),
        "n_pos": int(len(pos_arr)),
        "n_neg": int(len(neg_arr)),
        "n_patients": len(groups),
    }


# --------------------------------------------------------------------------- persistence / ONNX
def save_reid(model: ReidModel, directory: Path) -> None:
    """Write ``reid.pt`` (weights) and ``reid.json`` (architecture, config, threshold, calibration)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.net.state_dict(), directory / WEIGHTS_FILE)
    meta: dict[str, Any] = {
        "arch": model.net.arch,
        "channels": model.net.channels,
        "embedding_dim": model.net.embedding_dim,
        "width": model.net.width,
        "resolution": model.resolution,
        "seed": model.seed,
        "threshold": model.threshold,
        "calibration": model.calibration,
        "config": model.cfg.model_dump(mode="json"),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_reid(directory: Path) -> ReidModel:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise DataError(f"no re-identification model in {directory} (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    net = ReidNet(meta["arch"], meta["channels"], meta["embedding_dim"], meta["width"])
    net.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    net.eval()
    return ReidModel(
        net=net,
        cfg=ReidConfig.model_validate({k: v for k, v in meta["config"].items() if k != "target_tpr"}),  # files written before target_tpr moved
        threshold=float(meta["threshold"]),
        calibration=meta["calibration"],
        seed=int(meta["seed"]),
        resolution=int(meta["resolution"]),
    )


def export_onnx(model: ReidModel, path: Path, opset: int = 17) -> Path:
    """Export with a dynamic batch axis via the TorchScript exporter (``dynamo=False``: no onnxscript needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = model.net.eval()
    dummy = torch.zeros(2, net.channels, model.resolution, model.resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (dummy,), str(path), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
        )  # fmt: skip
    return path


class OnnxEmbedder:
    """Runs an exported ReidNet with onnxruntime on CPU."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # idle worker threads sleep instead of spinning: on a shared CPU spinning took cycles from the work itself
        # (8,000 images, 2 threads on a loaded 2-core box: 3.1-3.4 s instead of 3.6-4.3 s; same outputs, bit for bit)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.dim = int(self.session.get_outputs()[0].shape[1])
        side = self.session.get_inputs()[0].shape[-1]
        self.resolution = side if isinstance(side, int) else None  # what the network was trained at

    def embed(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """NCHW [-1, 1] -> [N, D] float32 normalised embeddings; images of another size are resized to the
        network's (the analysis resolution)."""
        from privdistill.imaging import resize_images

        if self.resolution is not None:
            images = resize_images(images, self.resolution)
        return self._embed(images, batch_size)

    def _embed(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        out = [self.session.run(None, {self.input_name: np.ascontiguousarray(images[s : s + batch_size], np.float32)})[0]
               for s in range(0, len(images), batch_size)]  # fmt: skip
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, self.dim), np.float32)
