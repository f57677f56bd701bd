"""DP-SGD step time vs the plain step for the tiny teacher (examples/tiny.yaml's model), in one process.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dp_step.py [--steps 10] [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

from privdistill.config import DPConfig, ModelConfig, TrainConfig
from privdistill.data.types import ImageSet
from privdistill.dp import DPPlan, DPTrainer
from privdistill.models import DiffusionModel
from privdistill.train import Trainer


def _data(n_patients: int, res: int) -> ImageSet:
    rng = np.random.default_rng(0)
    n = 2 * n_patients
    return ImageSet(images=rng.uniform(-1, 1, (n, 1, res, res)).astype(np.float32), labels=rng.integers(0, 3, n),
                    patient_ids=np.repeat([f"p{i}" for i in range(n_patients)], 2), class_names=["a", "b", "c"])


def _model(res: int) -> DiffusionModel:
    return DiffusionModel.from_config(ModelConfig(block_out_channels=[16, 32], norm_num_groups=8), resolution=res,
                                      channels=1, class_names=["a", "b", "c"], seed=0)


def _time(trainer: Trainer, steps: int) -> float:
    trainer.train_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    n_units = 120
    data = _data(n_units, args.resolution)
    cfg = TrainConfig(steps=10_000, batch_size=args.batch, warmup_steps=0, log_every=10_000)
    # sample rate 1.0 would not be DP, but makes the DP logical batch exactly `batch` for a like-for-like timing
    plan = DPPlan(noise_multiplier=1.0, sample_rate=args.batch / n_units, steps=cfg.steps, delta=1e-5,
                  n_units=n_units, expected_batch_size=args.batch, planned_epsilon=float("nan"))
    results = {"plain": _time(Trainer(_model(args.resolution), data, cfg, seed=0), args.steps)}
    variants = {
        "dp_hooks": DPConfig(epsilon=10),
        "dp_hooks_physical8": DPConfig(epsilon=10, physical_batch_size=8),
        "dp_functorch": DPConfig(epsilon=10, grad_sample_mode="functorch"),
        "dp_hooks_multiplicity4": DPConfig(epsilon=10, augment_multiplicity=4),
    }
    for name, dp in variants.items():
        tr = DPTrainer(_model(args.resolution), data, cfg, dp, seed=0, plan=plan, secret_seed=0)
        results[name] = _time(tr, args.steps)
    out = {
        "torch_threads": torch.get_num_threads(), "batch": args.batch, "resolution": args.resolution,
        "steps_timed": args.steps, "seconds_per_step": {k: round(v, 4) for k, v in results.items()},
        "ratio_vs_plain": {k: round(v / results["plain"], 2) for k, v in results.items() if k != "plain"},
        "note": "DP batches are Poisson-sampled (expected size = batch); plain batches have exactly `batch` images",
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
