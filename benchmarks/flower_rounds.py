"""Benchmark: where a federated round's overhead goes on a site (round wall time minus local training time).

Flower 1.41's SuperNode runs every train message in a fresh `flwr-clientapp` process (subprocess isolation, and
with `--isolation process` the long-running SuperExec still starts one `flwr-clientapp --token` per message), so a
round pays, before any training: the interpreter start, importing Flower and the ClientApp, then importing the
training stack (torch, diffusers) that ``train_local`` needs, and building the student. This benchmark times those
steps in a fresh process per round (what Flower does today) and in one warm process (what a long-running trainer
would pay), with the same local training in both, so the difference is the overhead a warm trainer removes.

Not measured here: Flower's own message transport and polling between SuperLink, SuperNode and ClientApp, and the
site's export gate + shard snapshot (see tests/e2e/test_federated.py for the whole path).

Usage:
  .venv/bin/python benchmarks/flower_rounds.py               # 3 rounds each way, 20 local steps
  .venv/bin/python benchmarks/flower_rounds.py --rounds 2 --steps 5
Writes benchmarks/results/flower_rounds.json (use --out to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "flower_rounds.json"

ROUND = r'''
import json, sys, time
t0 = float(sys.argv[1])
marks = {"process_start_s": time.time() - t0}

def round_once(steps):
    t = time.perf_counter()
    import flwr.clientapp  # noqa: F401
    import site_agent.federated  # noqa: F401
    out = {"import_clientapp_s": time.perf_counter() - t}
    t = time.perf_counter()
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from privdistill.config import ModelConfig, TrainConfig
    from privdistill.data.types import ImageSet
    from privdistill.models import DiffusionModel
    from privdistill.train import Dist, Trainer
    out["import_training_stack_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = DiffusionModel.from_config(ModelConfig(block_out_channels=[16, 32], norm_num_groups=8,
                                                   num_train_timesteps=100), resolution=28, channels=1,
                                       class_names=["a", "b"], seed=0)
    rng = np.random.default_rng(0)
    data = ImageSet(rng.uniform(-1, 1, (64, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 2, 64),
                    class_names=["a", "b"])
    out["build_model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    Trainer(model, data, TrainConfig(steps=steps, batch_size=16, warmup_steps=0, log_every=10_000,
                                     checkpoint_every=10_000, mixed_precision="no"), seed=0, dist_info=Dist()).fit()
    out["train_s"] = time.perf_counter() - t
    return out

steps, repeats = int(sys.argv[2]), int(sys.argv[3])
rounds = []
for i in range(repeats):
    t = time.perf_counter()
    r = round_once(steps)
    r["wall_s"] = time.perf_counter() - t + (marks["process_start_s"] if i == 0 else 0.0)
    if i == 0:
        r["process_start_s"] = marks["process_start_s"]
    rounds.append(r)
print(json.dumps(rounds))
'''


def run(steps: int, repeats: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", ROUND, repr(t0), str(steps), str(repeats)], env=env, check=True,
                         capture_output=True, text=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="local training steps per round")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    fresh, warm = [], []
    for i in range(args.rounds):  # alternate, so drift on a shared CPU hits both
        fresh += run(args.steps, 1)
        print(f"fresh process round {i}: {json.dumps({k: round(v, 2) for k, v in fresh[-1].items()})}", flush=True)
    warm_all = run(args.steps, args.rounds + 1)
    warm = warm_all[1:]  # the first round of the warm process is a fresh one
    for i, r in enumerate(warm):
        print(f"warm process round {i}: {json.dumps({k: round(v, 2) for k, v in r.items()})}", flush=True)

    def overhead(rs: list[dict]) -> float:
        return statistics.median(r["wall_s"] - r["train_s"] for r in rs)

    result = {
        "benchmark": "flower_rounds",
        "config": {"rounds": args.rounds, "local_steps": args.steps, "model": "UNet [16, 32], 28x28, batch 16",
                   "threads": 1},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_1min": os.getloadavg()[0], "note": "CPU shared with other jobs; numbers vary"},
        "fresh_process_per_round": fresh,
        "warm_process": warm,
        "median_overhead_fresh_s": round(overhead(fresh), 2),
        "median_overhead_warm_s": round(overhead(warm), 2),
        "median_train_s": round(statistics.median(r["train_s"] for r in fresh + warm), 2),
        "goal_overhead_s": 5.0,
        "not_measured": "Flower message transport/polling; export gate and shard snapshot",
    }
    print(f"median per-round overhead (wall - training): fresh process {result['median_overhead_fresh_s']} s, "
          f"warm process {result['median_overhead_warm_s']} s (goal <= 5 s); training {result['median_train_s']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
