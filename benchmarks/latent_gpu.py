"""Benchmark (GPU): a latent model at clinical resolution — fine-tune, sample, filter — in fp32 and bf16.

A small Stable-Diffusion-layout pipeline folder (random weights; tests/_latent.py: VAE downsampling 8,
UNet widths 64/128/256) stands in for a hospital's checkpoint. Real Fashion-MNIST images upsampled to
``--resolution`` (default 256) are the data. For each precision (``mixed_precision: no`` = fp32, ``bf16``
= autocast): ``--steps`` training steps of privdistill's Trainer (after ``--warmup``), DDIM sampling of
``--samples`` images, then the filter (re-id embeddings + pixel near-duplicates) at
``--analysis-resolution``. Reported: training and sampling images/s, filter seconds, peak GPU memory
(torch.cuda.max_memory_allocated) per phase; bf16 / fp32 ratios.

Usage (on the GPU machine):
  .venv/bin/python benchmarks/latent_gpu.py                 # 256 px, batch 16, 50 steps
  .venv/bin/python benchmarks/latent_gpu.py --quick         # CPU smoke test (64 px, 2 steps)
Writes benchmarks/results/latent_gpu.json (--out to write elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "latent_gpu.json"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def images(n: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    from privdistill.imaging import resize_images

    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)[:n].astype(np.int64)
    return resize_images(raw.astype(np.float32) / 127.5 - 1, resolution), labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run(folder: Path, precision: str, args: argparse.Namespace, device: torch.device) -> dict:
    from privdistill.config import FilterConfig, ModelConfig, ReidConfig, TrainConfig
    from privdistill.data.types import ImageSet
    from privdistill.filter import filter_synthetic
    from privdistill.imaging import at_resolution
    from privdistill.models import DiffusionModel
    from privdistill.reid import train_reid
    from privdistill.sample import ddim_sample
    from privdistill.train import Trainer, autocast_for

    x, y = images(args.n_images, args.resolution)
    names = [str(i) for i in range(10)]
    data = ImageSet(images=x, labels=y, class_names=names, patient_ids=np.array([f"p{i}" for i in range(len(x))]))
    out: dict = {}
    reset(device)
    model = DiffusionModel.from_config(ModelConfig(type="latent", pretrained_path=folder), resolution=args.resolution,
                                       channels=1, class_names=names, seed=0)
    cfg = TrainConfig(steps=10**6, batch_size=args.batch_size, warmup_steps=0, mixed_precision=precision,
                      log_every=10**6)
    trainer = Trainer(model, data, cfg, seed=0, device=device)
    for _ in range(args.warmup):
        trainer.train_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    sync(device)
    dt = time.perf_counter() - t0
    out["train"] = {"images_per_s": round(args.steps * args.batch_size / dt, 2), "peak_gib": peak(device)}
    reset(device)
    labels = np.arange(args.samples) % 10
    ctx = autocast_for(device, precision) if precision != "no" else contextlib.nullcontext()
    with ctx:
        ddim_sample(model, labels=labels[: args.batch_size], steps=2, batch_size=args.batch_size, device=device,
                    progress=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        samples = ddim_sample(model, labels=labels, steps=args.ddim_steps, batch_size=args.batch_size, device=device,
                              progress=False)
        sync(device)
    dt = time.perf_counter() - t0
    out["sample"] = {"images_per_s": round(args.samples / dt, 2), "ddim_steps": args.ddim_steps,
                     "peak_gib": peak(device)}
    train_a = at_resolution(data, args.analysis_resolution)
    reid = train_reid(train_a, ReidConfig(steps=args.reid_steps, batch_size=64), seed=0)
    t0 = time.perf_counter()
    syn = at_resolution(ImageSet(images=samples, labels=labels, class_names=names), args.analysis_resolution)
    res = filter_synthetic(syn, train_a, embed=reid.embed, threshold=reid.threshold, cfg=FilterConfig())
    out["filter"] = {"seconds": round(time.perf_counter() - t0, 3), "n_synthetic": len(syn), "n_real": len(train_a),
                     "dropped": int(len(res.dropped)), "analysis_resolution": args.analysis_resolution}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--ddim-steps", type=int, default=25)
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--analysis-resolution", type=int, default=64)
    ap.add_argument("--reid-steps", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.resolution, args.batch_size, args.steps, args.warmup = 64, 2, 2, 1
        args.samples, args.ddim_steps, args.n_images, args.analysis_resolution, args.reid_steps = 4, 2, 32, 16, 5
    from _latent import tiny_pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = tiny_pipeline(Path(tempfile.mkdtemp()) / "sd", vae_channels=(32, 64, 128, 128),
                           unet_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=128)
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "setup": {k: v for k, v in vars(args).items() if k not in ("out", "quick")}, "precision": {}}
    precisions = ["no", "bf16"] if device.type == "cuda" else ["no"]  # autocast is CUDA-only here
    for p in precisions:
        result["precision"]["fp32" if p == "no" else p] = run(folder, p, args, device)
    P = result["precision"]
    if "bf16" in P:
        result["bf16_over_fp32"] = {
            "train_images_per_s": round(P["bf16"]["train"]["images_per_s"] / P["fp32"]["train"]["images_per_s"], 3),
            "sample_images_per_s": round(P["bf16"]["sample"]["images_per_s"] / P["fp32"]["sample"]["images_per_s"], 3),
        }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
