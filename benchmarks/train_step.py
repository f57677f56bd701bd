"""Benchmark: privdistill's training step vs a plain diffusers training loop.

Both loops train the SAME UNet config (same initial weights), on the same Fashion-MNIST images,
batch size, device, optimizer (AdamW, same lr / weight decay) and EMA (diffusers ``EMAModel``,
same decay). Timed loops alternate in blocks (the order rotates every repetition) so drift from
a shared, noisy CPU hits all of them alike; warm-up steps are excluded; per-step medians are
reported.

Loops:
  ours        ``privdistill.train.Trainer.train_step``: per-step seeded CPU generator, batch /
              timestep / noise draw, CPU->device copies, class conditioning, DDPM loss, AdamW,
              grad-norm clip, LR-schedule step, EMA update.
  plain       the textbook diffusers loop: random batch indices, ``torch.randn`` noise, random
              timesteps, ``scheduler.add_noise``, ``unet(noisy, t, class_labels=y).sample``, MSE,
              zero_grad, backward, AdamW step, ``EMAModel.step``.
  plain_full  ``plain`` + ``clip_grad_norm_`` + ``lr_scheduler.step()`` (what diffusers'
              train_unconditional.py also does), i.e. the same work as ``ours``.

Usage:
  .venv/bin/python benchmarks/train_step.py                   # 28x28, [32,64,64], batch 64
  .venv/bin/python benchmarks/train_step.py --quick           # seconds; smoke test
  .venv/bin/python benchmarks/train_step.py --steps 40 --batch-size 32 --resolution 16
Writes benchmarks/results/train_step.json (use --out to write elsewhere).
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FMNIST_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
CLASS_NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle-boot"]
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"

BASELINE_DESCRIPTION = {
    "ours": "privdistill.train.Trainer.train_step: step_generator(seed, step) + draw_batch (CPU) + "
            "CPU->device copies + model.condition + diffusion_loss (add_noise, unet, MSE) + zero_grad + "
            "backward + clip_grad_norm_(1.0) + AdamW.step + lr_scheduler.step (constant_with_warmup) + "
            "EMAModel.step",
    "plain": "textbook diffusers loop: torch.randint batch indices + torch.randn noise + torch.randint "
             "timesteps (global RNG, on device) + DDPMScheduler.add_noise + unet(noisy, t, class_labels).sample "
             "+ F.mse_loss + zero_grad + backward + AdamW.step + EMAModel.step (no grad clip, no LR schedule)",
    "plain_full": "plain + clip_grad_norm_(1.0) + lr_scheduler.step (constant_with_warmup): the same work as ours",
}


def load_images(n: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """First ``n`` Fashion-MNIST training images, NCHW float32 in [-1, 1], resized to ``resolution``."""
    with gzip.open(FMNIST, "rb") as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(FMNIST_LABELS, "rb") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)[:n].astype(np.int64)
    x = torch.from_numpy(raw.astype(np.float32) / 127.5 - 1.0)[:, None]
    if resolution != 28:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1).numpy(), labels


class Ours:
    name = "ours"

    def __init__(self, model_cfg, train_cfg, images, labels, device, init_state):
        from privdistill.data.types import ImageSet
        from privdistill.models import DiffusionModel
        from privdistill.train import Trainer

        res = images.shape[-1]
        self.model = DiffusionModel.from_config(model_cfg, resolution=res, channels=1, class_names=CLASS_NAMES)
        self.model.unet.load_state_dict(init_state)
        self.model.unet.train()
        data = ImageSet(images=images, labels=labels, class_names=CLASS_NAMES)
        self.trainer = Trainer(self.model, data, train_cfg, seed=0, device=device)

    def step(self) -> float:
        return self.trainer.train_step()


class Plain:
    def __init__(self, model_cfg, train_cfg, images, labels, device, init_state, *, full: bool):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from privdistill.models import build_scheduler, build_unet

        self.name = "plain_full" if full else "plain"
        self.full, self.device, self.cfg = full, device, train_cfg
        res = images.shape[-1]
        self.unet = build_unet(model_cfg, resolution=res, channels=1, num_classes=len(CLASS_NAMES)).to(device)
        self.unet.load_state_dict(init_state)
        self.unet.train()
        self.scheduler = build_scheduler(model_cfg)
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.opt, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=train_cfg.steps
        )
        self.ema = EMAModel(self.unet.parameters(), decay=train_cfg.ema_decay)
        self.T = self.scheduler.config.num_train_timesteps

    def step(self) -> float:
        bs = self.cfg.batch_size
        idx = torch.randint(0, len(self.images), (bs,), device=self.device)
        x0, y = self.images[idx], self.labels[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.T, (bs,), device=self.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = self.unet(noisy, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.full:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.full:
            self.lr_scheduler.step()
        self.ema.step(self.unet.parameters())
        return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def breakdown(ours: Ours, steps: int, device: torch.device) -> dict[str, float]:
    """Median ms of each part of Trainer.train_step, re-doing its calls one by one with timers
    (mirrors privdistill/train.py; run after the timed comparison, on the same trainer)."""
    from privdistill.train import autocast_for, diffusion_loss, draw_batch, step_generator

    tr, parts = ours.trainer, {}

    def tick(name, t0):
        _sync(device)
        t1 = time.perf_counter()
        parts.setdefault(name, []).append((t1 - t0) * 1e3)
        return t1

    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        g = step_generator(tr.seed, tr.step)
        shape = tuple(tr.images.shape[1:])
        idx, tt, noise = draw_batch(len(tr.images), tr.cfg.batch_size, tr.model.scheduler.config.num_train_timesteps, shape, g)
        t = tick("generator+draw_batch (CPU)", t)
        tt, noise = tt.to(tr.device), noise.to(tr.device)
        x0 = tr.images[idx.to(tr.device)]
        labels = tr.labels[idx]
        t = tick("copies+gather", t)
        with autocast_for(tr.device, tr.cfg.mixed_precision):
            cond = tr.model.condition(labels, None, tr.device, text_encoder=tr.text_encoder)
            loss = diffusion_loss(tr.model, tr.unet, x0, tt, noise, cond)
        t = tick("forward (add_noise+unet+mse)", t)
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t = tick("backward", t)
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.cfg.grad_clip)
        t = tick("clip_grad_norm_", t)
        tr.optimizer.step()
        t = tick("AdamW.step", t)
        tr.lr_scheduler.step()
        t = tick("lr_scheduler.step", t)
        tr.ema.step(tr.model.parameters())
        t = tick("EMAModel.step", t)
        tr.step += 1
        float(loss.detach())
    return {k: round(statistics.median(v), 3) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per loop (default 40)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per loop (default 5)")
    ap.add_argument("--block", type=int, default=5, help="steps per loop before switching loops (default 5)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--channels", type=str, default="32,64,64", help="block_out_channels (default 32,64,64)")
    ap.add_argument("--n-images", type=int, default=1024, help="Fashion-MNIST training images in memory")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing of train_step")
    ap.add_argument("--quick", action="store_true", help="16x16, batch 16, 6 timed steps: a smoke test")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.block, a.batch_size, a.resolution, a.n_images = 6, 2, 3, 16, 16, 256
        a.channels = "16,32"

    from privdistill.config import ModelConfig, TrainConfig
    from privdistill.logs import configure_logging
    from privdistill.models import build_unet

    configure_logging("console", "warning")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device == "cuda" else "cpu")
    channels = [int(c) for c in a.channels.split(",")]
    model_cfg = ModelConfig(block_out_channels=channels)
    total = a.warmup + a.steps + (0 if a.no_breakdown else a.steps)
    train_cfg = TrainConfig(steps=10 * total + 100, batch_size=a.batch_size, learning_rate=2e-4, warmup_steps=50,
                            ema_decay=0.999, grad_clip=1.0, mixed_precision="no")
    images, labels = load_images(a.n_images, a.resolution)
    torch.manual_seed(0)
    init_state = build_unet(model_cfg, resolution=a.resolution, channels=1, num_classes=len(CLASS_NAMES)).state_dict()

    loops = [
        Ours(model_cfg, train_cfg, images, labels, device, init_state),
        Plain(model_cfg, train_cfg, images, labels, device, init_state, full=False),
        Plain(model_cfg, train_cfg, images, labels, device, init_state, full=True),
    ]
    n_params = sum(p.numel() for p in loops[1].unet.parameters())
    for lp in loops:  # warm-up (allocator, kernels, first optimizer state), not timed
        for _ in range(a.warmup):
            lp.step()
    times: dict[str, list[float]] = {lp.name: [] for lp in loops}
    losses: dict[str, list[float]] = {lp.name: [] for lp in loops}
    block_means: dict[str, list[float]] = {lp.name: [] for lp in loops}
    reps = -(-a.steps // a.block)
    t_start = time.time()
    for r in range(reps):
        order = loops[r % len(loops):] + loops[: r % len(loops)]  # rotate who goes first
        for lp in order:
            n = min(a.block, a.steps - r * a.block)
            blk = []
            for _ in range(n):
                _sync(device)
                t0 = time.perf_counter()
                losses[lp.name].append(lp.step())
                _sync(device)
                blk.append(time.perf_counter() - t0)
            times[lp.name].extend(blk)
            block_means[lp.name].append(float(np.mean(blk)))
    wall = time.time() - t_start

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    # paired ratio: per repetition, ours' block mean over plain's block mean; median over repetitions
    paired = {
        k: statistics.median(o / p for o, p in zip(block_means["ours"], block_means[k], strict=True)) for k in ("plain", "plain_full")
    }
    result = {
        "config": {
            "resolution": a.resolution, "block_out_channels": channels, "batch_size": a.batch_size,
            "layers_per_block": model_cfg.layers_per_block, "parameters": n_params,
            "timed_steps_per_loop": a.steps, "warmup_steps_per_loop": a.warmup, "block": a.block,
            "n_images": a.n_images, "quick": a.quick,
        },
        "environment": {
            "device": str(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
            "cpu_count_visible": __import__("os").cpu_count(),
            "loadavg_at_end": list(__import__("os").getloadavg()),
        },
        "loops": BASELINE_DESCRIPTION,
        "median_ms_per_step": {k: round(v, 3) for k, v in med.items()},
        "p10_p90_ms": {k: [round(float(np.quantile(v, q)) * 1e3, 3) for q in (0.1, 0.9)] for k, v in times.items()},
        "ratio_ours_over_plain": round(med["ours"] / med["plain"], 4),
        "ratio_ours_over_plain_full": round(med["ours"] / med["plain_full"], 4),
        "paired_block_ratio_ours_over_plain": round(paired["plain"], 4),
        "paired_block_ratio_ours_over_plain_full": round(paired["plain_full"], 4),
        "goal_ratio_max": 1.05,
        "mean_loss": {k: round(float(np.mean(v)), 5) for k, v in losses.items()},
        "timed_wall_seconds": round(wall, 1),
    }
    if not a.no_breakdown:
        result["ours_breakdown_median_ms"] = breakdown(loops[0], a.steps, device)
    result["meets_goal"] = result["ratio_ours_over_plain"] <= 1.05

    print(f"train_step benchmark  device={device} threads={torch.get_num_threads()}  "
          f"{a.resolution}x{a.resolution} channels={channels} batch={a.batch_size} params={n_params:,}")
    print(f"  timed: {a.steps} steps/loop after {a.warmup} warm-up, alternating blocks of {a.block}")
    for k in times:
        lo, hi = result["p10_p90_ms"][k]
        print(f"  {k:<11} median {med[k]:8.2f} ms/step   (p10 {lo:.2f}, p90 {hi:.2f})")
    print(f"  ratio ours/plain      = {result['ratio_ours_over_plain']:.3f}  (paired blocks: {paired['plain']:.3f})"
          f"   goal <= 1.05: {'MET' if result['meets_goal'] else 'NOT MET'}")
    print(f"  ratio ours/plain_full = {result['ratio_ours_over_plain_full']:.3f}  (paired blocks: {paired['plain_full']:.3f})")
    print("  baseline 'plain' includes: " + BASELINE_DESCRIPTION["plain"])
    print("  baseline 'plain_full' adds: clip_grad_norm_ + lr_scheduler.step")
    if "ours_breakdown_median_ms" in result:
        print("  ours, per-part median ms: " + ", ".join(f"{k} {v}" for k, v in result["ours_breakdown_median_ms"].items()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
