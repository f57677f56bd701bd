"""Benchmark: fine-tuning a latent model's UNet in full vs through LoRA adapters, with and without DP-SGD.

A small Stable-Diffusion-layout pipeline folder (random weights; tests/_latent.py) stands in for a
hospital's checkpoint. Every variant trains the SAME UNet from the same folder on the same images
through privdistill's own trainers (``Trainer.train_step``; ``DPTrainer.train_step`` with a fixed noise
multiplier, Poisson sampling, physical batch = logical batch). Reported per variant: trained parameters,
AdamW state bytes (2 fp32 moments per trained parameter), median step time. Timed blocks alternate
between variants (order rotating each repetition) so a shared CPU's drift hits all alike; warm-up steps
excluded. The baseline is full fine-tuning in the same process; ratios are LoRA / full.

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latent_lora.py             # 128 px, batch 4
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latent_lora.py --quick     # seconds; smoke test
Writes benchmarks/results/latent_lora.json (--out to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "latent_lora.json"


def build(folder: Path, variant: str, args: argparse.Namespace, data):
    from privdistill.config import DPConfig, ModelConfig, TrainConfig
    from privdistill.dp import DPTrainer, plan_dp, privacy_units
    from privdistill.models import DiffusionModel
    from privdistill.train import Trainer

    lora = {"rank": args.rank} if variant.startswith("lora") else None
    model = DiffusionModel.from_config(ModelConfig(type="latent", pretrained_path=folder, lora=lora),
                                       resolution=args.resolution, channels=1, class_names=["a", "b"], seed=0)
    cfg = TrainConfig(steps=10**6, batch_size=args.batch_size, warmup_steps=0, log_every=10**6)
    if not variant.endswith("dp"):
        return Trainer(model, data, cfg, seed=0, device=torch.device("cpu"))
    dp = DPConfig(epsilon=1e6, noise_multiplier=1.0, physical_batch_size=args.batch_size)
    plan = plan_dp(dp, cfg.model_copy(update={"steps": 100}), len(privacy_units(data, "patient")))
    return DPTrainer(model, data, cfg, dp, seed=0, plan=plan, device=torch.device("cpu"), secret_seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per block")
    ap.add_argument("--reps", type=int, default=3, help="blocks per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-dp", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.resolution, args.steps, args.reps = 64, 1, 1
    torch.set_num_threads(1)
    from _latent import tiny_pipeline

    from privdistill.data.types import ImageSet

    folder = tiny_pipeline(Path(tempfile.mkdtemp()) / "sd", vae_channels=(16, 32, 32, 32),
                           unet_channels=(32, 64, 128), layers_per_block=2, cross_attention_dim=64)
    n = 8 * args.batch_size
    rng = np.random.default_rng(0)
    data = ImageSet(images=rng.uniform(-1, 1, (n, 1, args.resolution, args.resolution)).astype(np.float32),
                    labels=np.arange(n) % 2, class_names=["a", "b"], patient_ids=np.array([f"p{i}" for i in range(n)]))
    variants = ["full", "lora"] + ([] if args.no_dp else ["full_dp", "lora_dp"])
    trainers = {v: build(folder, v, args, data) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for tr in trainers.values():
        for _ in range(args.warmup):
            tr.train_step()
    for r in range(args.reps):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainers[v].train_step()
                times[v].append(time.perf_counter() - t0)
    out: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, CPU",
        "setup": {"resolution": args.resolution, "latent": list(trainers["full"].model.sample_shape),
                  "batch_size": args.batch_size, "lora_rank": args.rank, "timed_steps": args.steps * args.reps,
                  "unet_parameters": sum(p.numel() for p in trainers["full"].model.unet.parameters())},
        "variants": {},
    }
    for v, tr in trainers.items():
        trained = sum(p.numel() for p in tr.model.parameters())
        out["variants"][v] = {"trained_parameters": trained, "adam_state_bytes": 8 * trained,
                              "median_step_s": round(statistics.median(times[v]), 4),
                              "step_s_min_max": [round(min(times[v]), 4), round(max(times[v]), 4)]}
    V = out["variants"]
    out["ratios_lora_over_full"] = {
        "trained_parameters": round(V["lora"]["trained_parameters"] / V["full"]["trained_parameters"], 5),
        "step_time": round(V["lora"]["median_step_s"] / V["full"]["median_step_s"], 3),
        **({"dp_step_time": round(V["lora_dp"]["median_step_s"] / V["full_dp"]["median_step_s"], 3)}
           if "full_dp" in V else {}),
    }
    print(json.dumps(out, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
