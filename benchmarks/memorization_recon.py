"""The memorization metric on a real teacher's own near-copies: how much of a
known copy the metric catches.

Takes a finished run's work directory (``privdistill run``), noises n training images to DDIM
timestep t and denoises them with the run's teacher, for several t, and reports the share that
`privdistill.metrics.memorization` calls memorized, with its 95% Wilson interval, whether the match
is the source patient, and how far the reconstruction moved (RMS on the [-1, 1] scale). The same is
done to held-out test images (patients never trained on): those reconstructions are not copies, so
their rate is the metric's false-positive rate on teacher output.

Usage:
  .venv/bin/python benchmarks/memorization_recon.py WORKDIR [--n 90] [--steps 20] [--t 50 100 200 300 500]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from privdistill.data.types import ImageSet
from privdistill.metrics import memorization
from privdistill.models import DiffusionModel


@torch.no_grad()
def reconstruct(model: DiffusionModel, x0: np.ndarray, labels: np.ndarray, t0: int, steps: int, seed: int) -> np.ndarray:
    """x0 noised to the last DDIM timestep <= t0, then denoised by the model (eta 0)."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler.from_config(model.scheduler.config)
    sch.set_timesteps(steps)
    ts = [t for t in sch.timesteps if t <= t0]
    x = torch.from_numpy(x0)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    x = sch.add_noise(x, eps, torch.full((len(x),), int(ts[0])))
    cond = model.condition(torch.as_tensor(labels).long(), None, torch.device("cpu"))
    for t in ts:
        x = sch.step(model.predict_noise(x, t.expand(len(x)), cond), t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--n", type=int, default=90)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--t", type=int, nargs="+", default=[50, 100, 200, 300, 500])
    args = ap.parse_args()
    torch.set_num_threads(1)
    train = ImageSet.load(args.workdir / "ingest" / "train.npz")
    test = ImageSet.load(args.workdir / "ingest" / "test.npz")
    if train.labels is None or test.labels is None or list(test.class_names) != list(train.class_names):
        raise SystemExit("needs a class-conditional run with labelled train and test sets of the same classes")
    model = DiffusionModel.load(args.workdir / "train-teacher" / "model")
    for m in model.modules():
        m.eval()
    rng = np.random.default_rng(0)
    pi = rng.choice(len(train), min(args.n, len(train)), replace=False)
    fi = rng.choice(len(test), min(args.n, len(test)), replace=False)
    print("| t | RMS moved | training images: memorized [95% CI] | same patient | fresh images: memorized [95% CI] |")
    print("|---|---:|---|---:|---|")
    for t0 in args.t:
        rc = reconstruct(model, train.images[pi], train.labels[pi], t0, args.steps, seed=0)
        rf = reconstruct(model, test.images[fi], test.labels[fi], t0, args.steps, seed=1)
        m, mf = memorization(rc, train), memorization(rf, train)
        hit = m["memorized"]
        same = (train.patient_ids[m["nearest_index"][hit]] == train.patient_ids[pi][hit]).mean() if hit.any() else float("nan")
        moved = float(np.sqrt(((rc - train.images[pi]) ** 2).mean()))
        ci, cf = m["ci"], mf["ci"]
        und = f" ({m['undecidable']} undecidable)" if m["undecidable"] else ""
        print(f"| {t0} | {moved:.3f} | {m['count']}/{m['n']} = {m['rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]{und} | "
              f"{same:.2f} | {mf['count']}/{mf['n']} = {mf['rate']:.3f} [{cf[0]:.3f}, {cf[1]:.3f}] |")


if __name__ == "__main__":
    main()
