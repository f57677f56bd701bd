"""glibc malloc settings (privdistill.allocator) vs glibc's defaults, on the demo's two largest CPU costs.

The settings are per process and cannot be undone inside one (glibc's default mmap threshold is dynamic; setting any
value fixes it), so each measurement is a fresh process that builds the model and runs the workload once, cold, as a
command-line tool does: one with the settings, one with PRIVDISTILL_MALLOC_TUNING=0, in alternating order (AB, BA,
AB, ...) within this one run so drift in the machine's load falls on both. Each pair prints tuned / default for wall
time, CPU time (user + system), system time and minor page faults; the summary is the median over pairs. Workload,
the demo teacher's architecture (examples/site-demo.yaml: [32, 64, 64] UNet, 28x28, 1 thread):

  - training steps through privdistill's own trainer (batch 32, the demo's);
  - the membership attack's scoring (``privdistill.audit.mia.denoising_losses``, 10 noise draws) on 256 images.

Usage:
  .venv/bin/python benchmarks/allocator.py                 # 4 pairs, ~8 min on one idle core
  .venv/bin/python benchmarks/allocator.py --runs 1 --steps 4 --images 64    # a smoke test
Writes benchmarks/results/allocator.{json,md} (or --out-dir)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _usage() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": time.perf_counter(), "user": r.ru_utime, "sys": r.ru_stime, "minflt": float(r.ru_minflt)}


def one_run(steps: int, images: int) -> dict:
    """The workload once in this process, with the settings unless PRIVDISTILL_MALLOC_TUNING=0."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from privdistill.allocator import tune_malloc
    from privdistill.audit.mia import denoising_losses
    from privdistill.config import load_config
    from privdistill.data.types import ImageSet
    from privdistill.models import DiffusionModel
    from privdistill.train import train_diffusion

    cfg = load_config(ROOT / "examples" / "site-demo.yaml")
    rng = np.random.default_rng(0)
    n_train = 256
    data = ImageSet(images=rng.uniform(-1, 1, (max(n_train, images), 1, 28, 28)).astype(np.float32),
                    labels=rng.integers(0, 5, max(n_train, images)), class_names=[f"c{i}" for i in range(5)])
    train_cfg = cfg.teacher.train.model_copy(update={"steps": steps, "checkpoint_every": 10**9, "log_every": 10**9,
                                                     "warmup_steps": 0})

    def workload() -> dict[str, float]:
        model = DiffusionModel.from_config(cfg.teacher.model, resolution=28, channels=1, class_names=data.class_names,
                                           prompts=None, seed=0)
        u0 = _usage()
        train_diffusion(model, data.subset(np.arange(n_train)), train_cfg, seed=0)
        u1 = _usage()
        denoising_losses(model, data.subset(np.arange(images)))
        u2 = _usage()
        return {f"{part}_{k}": round(b[k] - a[k], 3) for part, a, b in (("train", u0, u1), ("mia", u1, u2))
                for k in ("wall", "user", "sys", "minflt")}

    applied = tune_malloc()
    return {"usage": workload(), "applied": applied}


def ratios(run: dict) -> dict[str, float]:
    out = {}
    for part in ("train", "mia"):
        for k in ("wall", "user", "sys", "minflt"):
            b, t = run["baseline"][f"{part}_{k}"], run["tuned"][f"{part}_{k}"]  # baseline: glibc's defaults
            out[f"{part}_{k}"] = round(t / b, 3) if b else float("nan")
        cpu_b = run["baseline"][f"{part}_user"] + run["baseline"][f"{part}_sys"]
        cpu_t = run["tuned"][f"{part}_user"] + run["tuned"][f"{part}_sys"]
        out[f"{part}_cpu"] = round(cpu_t / cpu_b, 3) if cpu_b else float("nan")
    return out


def render_md(res: dict) -> str:
    keys = ["train_wall", "train_cpu", "train_sys", "train_minflt", "mia_wall", "mia_cpu", "mia_sys", "mia_minflt"]
    lines = [f"# glibc malloc settings vs defaults ({res['runs']} runs, {res['steps']} training steps, "
             f"{res['images']} images in the membership attack)", "",
             f"Run {res['finished_at']} on {res['machine']}, 1 torch thread, load average {res['loadavg']}.", "",
             "| pair | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for i, r in enumerate(res["per_run"]):
        lines.append(f"| {i + 1} | " + " | ".join(f"{r['ratios'][k]:.3f}" for k in keys) + " |")
    lines.append("| **median** | " + " | ".join(f"**{res['median'][k]:.3f}**" for k in keys) + " |")
    lines += ["", "Each cell is tuned / glibc's defaults, one fresh process each, alternating order (below 1: the "
              "settings help). Absolute numbers per process are in the JSON.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4, help="pairs of processes (default 4)")
    ap.add_argument("--steps", type=int, default=12, help="training steps per timed block (default 12)")
    ap.add_argument("--images", type=int, default=256, help="images scored by the membership attack (default 256)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(one_run(a.steps, a.images)))
        return 0
    per_run = []

    def child(tuned: bool) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PRIVDISTILL_MALLOC_TUNING": "1" if tuned else "0"}
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(a.steps), "--images", str(a.images)],
                             env=env, check=True, capture_output=True, text=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        if tuned and not (got["applied"] and all(got["applied"].values())):
            raise SystemExit(f"glibc refused a setting: {got['applied']}")
        return got["usage"]

    for i in range(a.runs):
        order = (True, False) if i % 2 == 0 else (False, True)
        got = {tuned: child(tuned) for tuned in order}
        run = {"order": ["tuned" if t else "default" for t in order], "baseline": got[False], "tuned": got[True]}
        run["ratios"] = ratios(run)
        per_run.append(run)
        print(f"pair {i + 1} ({'/'.join(run['order'])}): " + ", ".join(f"{k} {v:.3f}" for k, v in run["ratios"].items()),
              flush=True)
    res = {
        "benchmark": "allocator", "runs": a.runs, "steps": a.steps, "images": a.images, "per_run": per_run,
        "median": {k: statistics.median(r["ratios"][k] for r in per_run) for k in per_run[0]["ratios"]},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "allocator.json").write_text(json.dumps(res, indent=2) + "\n")
    md = render_md(res)
    (a.out_dir / "allocator.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
