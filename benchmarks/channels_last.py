"""Channels-last (NHWC) UNet weights vs the standard (NCHW) layout, on the demo's CPU costs.

``privdistill.models.DiffusionModel`` keeps its UNet's weights in channels-last layout (oneDNN then runs every
convolution in NHWC). This compares, in one process and on the demo teacher's architecture (examples/site-demo.yaml:
[32, 64, 64] UNet, 28x28, 1 torch thread), two copies of the same model, one converted back to the standard layout:

  - training steps through privdistill's own trainer (batch 32, the demo's);
  - the membership attack's scoring (``privdistill.audit.mia.denoising_losses``, 10 noise draws) on 256 images,
    the forward-only work that sampling and both membership attacks of the demo are made of.

Rounds alternate the order (AB, BA, ...) so drift in the machine's load falls on both; each round prints
channels-last / standard wall time; the summary is the median over rounds with the range. It also checks that the
two layouts compute the same thing (largest absolute difference of the attack's losses and of the training losses).

Usage:
  .venv/bin/python benchmarks/channels_last.py                   # 5 rounds, ~4 min on one idle core
  .venv/bin/python benchmarks/channels_last.py --rounds 1 --steps 2 --images 32    # a smoke test
Writes benchmarks/results/channels_last.{json,md} (or --out-dir)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def build(layout: str, data, cfg):  # benchmark glue
    from privdistill.models import DiffusionModel
    from privdistill.train import Trainer

    model = DiffusionModel.from_config(cfg.teacher.model, resolution=28, channels=1, class_names=data.class_names,
                                       seed=0)
    if layout == "standard":
        model.unet.to(memory_format=torch.contiguous_format)
    train_cfg = cfg.teacher.train.model_copy(update={"steps": 10**6, "checkpoint_every": 10**9, "log_every": 10**9,
                                                     "warmup_steps": 0})
    return model, Trainer(model, data, train_cfg, seed=0, device=torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="training steps per measurement")
    ap.add_argument("--images", type=int, default=256, help="images scored per measurement")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    from privdistill.audit.mia import denoising_losses
    from privdistill.config import load_config
    from privdistill.data.types import ImageSet

    cfg = load_config(ROOT / "examples" / "site-demo.yaml")
    rng = np.random.default_rng(0)
    n = max(256, args.images)
    data = ImageSet(images=rng.uniform(-1, 1, (n, 1, 28, 28)).astype(np.float32),
                    labels=rng.integers(0, 5, n), class_names=[f"c{i}" for i in range(5)])
    score_set = data.subset(np.arange(args.images))
    arms = {layout: build(layout, data, cfg) for layout in ("channels_last", "standard")}
    # same computation: the attack's losses on the untrained models, then one training step each
    losses = {k: denoising_losses(m, score_set) for k, (m, _) in arms.items()}
    max_loss_diff = float(np.abs(losses["channels_last"] - losses["standard"]).max())
    step_loss = {k: tr.train_step() for k, (_, tr) in arms.items()}
    max_step_diff = abs(step_loss["channels_last"] - step_loss["standard"])

    rounds = []
    for r in range(args.rounds):
        order = ("channels_last", "standard") if r % 2 == 0 else ("standard", "channels_last")
        row: dict[str, dict[str, float]] = {"train_s_per_step": {}, "score_ms_per_image": {}}
        for k in order:
            model, trainer = arms[k]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            row["train_s_per_step"][k] = (time.perf_counter() - t0) / args.steps
            model.unet.eval()
            t0 = time.perf_counter()
            denoising_losses(model, score_set)
            row["score_ms_per_image"][k] = (time.perf_counter() - t0) / (args.images * 10) * 1000
            model.unet.train()
        ratios = {w: v["channels_last"] / v["standard"] for w, v in row.items()}
        rounds.append({"order": list(order), **row, "ratio": ratios})
        print(f"round {r + 1}/{args.rounds} ({order[0]} first): training {ratios['train_s_per_step']:.3f}x "
              f"({row['train_s_per_step']['channels_last']:.3f} vs {row['train_s_per_step']['standard']:.3f} s/step), "
              f"scoring {ratios['score_ms_per_image']:.3f}x ({row['score_ms_per_image']['channels_last']:.2f} vs "
              f"{row['score_ms_per_image']['standard']:.2f} ms per image and noise draw)", flush=True)

    summary = {}
    for w in ("train_s_per_step", "score_ms_per_image"):
        rs = [r["ratio"][w] for r in rounds]
        summary[w] = {"median_ratio": statistics.median(rs), "min_ratio": min(rs), "max_ratio": max(rs),
                      "median_channels_last": statistics.median(r[w]["channels_last"] for r in rounds),
                      "median_standard": statistics.median(r[w]["standard"] for r in rounds)}
    result = {
        "benchmark": "channels_last", "rounds": args.rounds, "steps": args.steps, "images": args.images,
        "torch": torch.__version__, "threads": 1, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_average_start": load_start,
        "max_abs_diff_attack_loss": max_loss_diff, "abs_diff_first_step_loss": max_step_diff,
        "summary": summary, "per_round": rounds,
    }
    print(f"channels-last / standard, median of {args.rounds} rounds (range): training step "
          f"{summary['train_s_per_step']['median_ratio']:.3f} ({summary['train_s_per_step']['min_ratio']:.3f}-"
          f"{summary['train_s_per_step']['max_ratio']:.3f}); attack scoring "
          f"{summary['score_ms_per_image']['median_ratio']:.3f} ({summary['score_ms_per_image']['min_ratio']:.3f}-"
          f"{summary['score_ms_per_image']['max_ratio']:.3f}); same results: largest difference of attack losses "
          f"{max_loss_diff:.2e}, of a training step's loss {max_step_diff:.2e}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result["load_average_end"] = os.getloadavg()
    (args.out_dir / "channels_last.json").write_text(json.dumps(result, indent=2))
    s = summary
    (args.out_dir / "channels_last.md").write_text(
        "# Channels-last UNet weights vs standard layout (benchmarks/channels_last.py)\n\n"
        f"Demo teacher architecture, 1 torch thread, {args.rounds} alternating rounds, load average at the end "
        f"{os.getloadavg()[0]:.2f}.\n\n"
        "| workload | channels-last | standard | ratio (median, range) |\n|---|---|---|---|\n"
        f"| training step, batch 32 | {s['train_s_per_step']['median_channels_last']:.3f} s | "
        f"{s['train_s_per_step']['median_standard']:.3f} s | {s['train_s_per_step']['median_ratio']:.3f} "
        f"({s['train_s_per_step']['min_ratio']:.3f}-{s['train_s_per_step']['max_ratio']:.3f}) |\n"
        f"| attack scoring, per image and noise draw | {s['score_ms_per_image']['median_channels_last']:.2f} ms | "
        f"{s['score_ms_per_image']['median_standard']:.2f} ms | {s['score_ms_per_image']['median_ratio']:.3f} "
        f"({s['score_ms_per_image']['min_ratio']:.3f}-{s['score_ms_per_image']['max_ratio']:.3f}) |\n\n"
        f"Same results: largest absolute difference of the attack's losses {max_loss_diff:.2e}, of the first "
        f"training step's loss {max_step_diff:.2e}.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
