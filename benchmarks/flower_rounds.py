"""Benchmark: where a federated round's overhead goes on a site (round wall time minus local training time).

Flower 1.41's SuperNode runs every train message in a fresh `flwr-clientapp` process (subprocess isolation, and
with `--isolation process` the long-running SuperExec still starts one `flwr-clientapp --token` per message), so a
round pays, before any training: the interpreter start, importing Flower and the ClientApp, then importing the
training stack (torch, diffusers) that ``train_local`` needs, and building the student. This benchmark times those
steps in a fresh process per round (Flower without the site's trainer), in one warm process (the floor), and as
`privdistill-site join` runs it now: a fresh ClientApp process per round (importing Flower and the ClientApp only)
handing loading and training of the gated snapshot to the warm site trainer (site_agent.trainer) over its
local socket. Same local training in
all three; overhead = round wall time minus local training time.

Not measured here: Flower's own message transport and polling between SuperLink, SuperNode and ClientApp, and the
site's export gate + shard snapshot: benchmarks/flower_overhead.py times whole rounds through real Flower processes.

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
    import site_agent.client_app  # noqa: F401
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
    t = time.perf_counter()  # train_s: Trainer construction + fit (the warm trainer's trainer_seconds also
    # includes the model build, ~0.05 s)
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


CLIENT = r'''
import json, sys, time
t0 = float(sys.argv[1])
start = time.time() - t0
t = time.perf_counter()
from collections import OrderedDict
import numpy as np
from flwr.app import Array, ArrayRecord
from site_agent import client_app, trainer
from privdistill.federated import StudentSpec
from privdistill.shard import parse_manifest
imported = time.perf_counter() - t
from pathlib import Path
spec = StudentSpec.from_json(open(sys.argv[2]).read())
arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in np.load(sys.argv[3]).items()))
snap = Path(sys.argv[5])
manifest = parse_manifest((snap / "manifest.json").read_bytes())
conn = trainer.connect(Path(sys.argv[4]))
assert conn is not None, "no trainer"
weights, report, n = trainer.train_round(conn, spec, arrays, snap / "shard.tar", manifest, 0)
wall = time.perf_counter() - t + start
print(json.dumps({"process_start_s": start, "import_clientapp_s": imported, "train_s": report["trainer_seconds"],
                  "wall_s": wall, "torch_imported": "torch" in sys.modules}))
'''


def _spec_json(steps: int) -> str:
    from privdistill.config import ModelConfig, TrainConfig
    from privdistill.federated import StudentSpec

    return StudentSpec(model=ModelConfig(block_out_channels=[16, 32], norm_num_groups=8, num_train_timesteps=100),
                       train=TrainConfig(steps=steps, batch_size=16, warmup_steps=0, log_every=10_000,
                                         checkpoint_every=10_000, mixed_precision="no"),
                       resolution=28, channels=1, class_names=["a", "b"], seed=0).to_json()


def run_with_trainer(steps: int, rounds: int) -> list[dict]:
    """A fresh ClientApp process per round (as Flower runs it) handing the training to a warm site trainer."""
    import signal
    import tempfile

    import numpy as np

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    work = Path(tempfile.mkdtemp(prefix="privdistill-flower-bench-"))
    spec_file, arrays_file = work / "spec.json", work / "arrays.npz"
    spec_file.write_text(_spec_json(steps))
    from privdistill.federated import StudentSpec
    from privdistill.models import DiffusionModel

    spec = StudentSpec.from_json(spec_file.read_text())
    model = DiffusionModel.from_config(spec.model, resolution=28, channels=1, class_names=spec.class_names, seed=0)
    np.savez(arrays_file, **{k: v.detach().numpy() for k, v in model.unet.state_dict().items()})
    from privdistill.data.types import ImageSet
    from privdistill.identity import generate_key
    from privdistill.shard import write_shard

    rng = np.random.default_rng(0)  # the gated snapshot: 64 samples, as in the other modes
    write_shard(ImageSet(rng.uniform(-1, 1, (64, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 2, 64),
                         class_names=["a", "b"]), work / "snap", site_id="bench", shard_id="snap",
                config_hash="0" * 64, privacy={"kept": 64}, key=generate_key())
    trainer = subprocess.Popen([sys.executable, "-m", "site_agent.trainer", "--workdir", str(work)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (work / ".flwr" / "trainer" / "trainer.key").exists():
            if trainer.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the site trainer did not start")
            time.sleep(0.2)
        out = []
        for i in range(rounds):
            res = subprocess.run([sys.executable, "-c", CLIENT, repr(time.time()), str(spec_file), str(arrays_file),
                                  str(work), str(work / "snap")], env=env, check=True, capture_output=True, text=True, timeout=1800)
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"fresh ClientApp + warm trainer round {i}: {json.dumps({k: round(v, 2) for k, v in out[-1].items()})}",
                  flush=True)
        return out
    finally:
        os.killpg(trainer.pid, signal.SIGTERM)
        trainer.wait(timeout=30)


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

    with_trainer = run_with_trainer(args.steps, args.rounds)

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
        "fresh_clientapp_with_warm_trainer": with_trainer,
        "median_overhead_fresh_s": round(overhead(fresh), 2),
        "median_overhead_warm_s": round(overhead(warm), 2),
        "median_overhead_fresh_clientapp_warm_trainer_s": round(overhead(with_trainer), 2),
        "median_train_s": round(statistics.median(r["train_s"] for r in fresh + warm), 2),
        "goal_overhead_s": 5.0,
        "not_measured": "Flower message transport/polling; export gate and shard snapshot",
    }
    print(f"median per-round overhead (wall - training): fresh process {result['median_overhead_fresh_s']} s "
          f"(Flower today without a trainer), fresh ClientApp + warm trainer "
          f"{result['median_overhead_fresh_clientapp_warm_trainer_s']} s (with `privdistill-site join`), warm process "
          f"{result['median_overhead_warm_s']} s; goal <= 5 s; training {result['median_train_s']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
