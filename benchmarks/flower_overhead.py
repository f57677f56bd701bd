"""Benchmark: the WHOLE per-round overhead of federated training through real Flower processes on loopback.

`privdistill-coordinator federate` (a real SuperLink: TLS, SuperNode authentication, no runtime installs,
telemetry off) and two `privdistill-site join` (real SuperNodes, the site's warm trainer, the ClientApp behind the
export gate and the shard snapshot check), exactly as the federated demo starts them, with tiny local training
(a [8, 16] UNet, a few steps on the site's 5-sample approved shard) so that the overhead dominates. Every output
line of every process is time-stamped as it arrives; a round's period at a site is the time from its
``Receiving: train message`` to the next one, and the overhead is that period minus the local training time
(measured in this process with the same spec, warm; a fraction of a second). Phases per round and site:
message received -> ClientApp done (``federated.trained``: process start, gate, snapshot, training, reply built)
-> reply sent -> next message received (waiting for the other site, the ServerApp's polling and aggregation,
the SuperNode's polling).

Baseline vs new in the same run: the baseline runs the source tree of ``--baseline-ref`` (``git archive`` into a
temporary directory, first on PYTHONPATH of every process it starts), the new one this checkout; runs alternate.
Not included: the ServerApp's evaluation on the coordinator's accepted shards (the coordinator here holds none;
the federated demo's coordinator does, so there each round adds one forward pass over 256 images).

Usage (from the repository root, Fashion-MNIST installed as the tests expect):
  nice -n 19 .venv/bin/python benchmarks/flower_overhead.py                 # 5 rounds, 1 run each way
  nice -n 19 .venv/bin/python benchmarks/flower_overhead.py --rounds 4 --runs 2
Writes benchmarks/results/flower_overhead.json (use --out to write elsewhere).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the sites' fixtures (Fashion-MNIST stand-ins) come from the tests
RESULTS = ROOT / "benchmarks" / "results" / "flower_overhead.json"
BIN = Path(sys.executable).parent
BASELINE_REF = "3c1e19e"  # main before the round-overhead work (issue 17)
SITES = ("site-a", "site-b")
MODEL = {"conditioning": "class", "block_out_channels": [8, 16], "norm_num_groups": 4, "num_train_timesteps": 50}
TRAIN = {"batch_size": 4, "learning_rate": 1.0e-3, "warmup_steps": 0, "mixed_precision": "no"}
MARKS = {  # phase name -> a substring of a line a site's processes print
    "received": "Receiving: train message",
    "clientapp_started": "Start `flwr-clientapp` process",
    "trained": "federated.trained",
    "sending": "Sending: train message",
    "sent": "Sent successfully",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stamped:
    """A process whose output lines are kept with the wall time they arrived at."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self.log = log
        # cwd outside the checkout: `python -m site_agent.trainer` puts its cwd first on sys.path, which would
        # import this checkout in the baseline run
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                     start_new_session=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "w", buffering=1) as fh:
            for raw in self.proc.stdout:
                t, line = time.time(), raw.decode(errors="replace").rstrip()
                self.lines.append((t, line))
                fh.write(f"{t:.3f} {line}\n")

    def seen(self, needle: str) -> bool:
        return any(needle in line for _, line in list(self.lines))

    def times(self, needle: str) -> list[float]:
        return [t for t, line in list(self.lines) if needle in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.thread.join(timeout=10)


def baseline_tree(ref: str, into: Path) -> Path:
    """The source tree of ``ref`` (git archive), to put first on PYTHONPATH."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def setup(root: Path, rounds: int, steps: int) -> dict[str, Any]:
    import yaml
    from test_export_gate import CLASSES, approved_shard, build_reid, make_site

    from coordinator.provision import provision

    prov = provision(root / "provision", list(SITES))
    reid = build_reid(root / "reid")
    sites = {}
    for sid in SITES:
        site = make_site(root / sid, reid, name=f"run-{sid}",
                         extra={"id": sid, "ca_file": str(prov.site_dirs[sid] / "ca.pem")})
        approved_shard(site)
        sites[sid] = site
    training = root / "training.yaml"
    training.write_text(yaml.safe_dump({
        "name": "flower-overhead", "seed": 0, "resolution": 28, "channels": 1,
        "student": {"model": MODEL, "train": TRAIN},
        "federated": {"rounds": rounds, "local_steps": steps, "min_nodes": len(SITES), "class_names": list(CLASSES),
                      "round_timeout_s": 300},
    }))
    return {"prov": prov, "sites": sites, "training": training, "classes": list(CLASSES)}


def local_training_s(classes: list[str], steps: int, repeats: int = 3) -> float:
    """Median seconds of one round's local training (model build + fit) with the federation's spec, warm."""
    import numpy as np
    import torch

    from privdistill.config import ModelConfig, TrainConfig
    from privdistill.data.types import ImageSet
    from privdistill.federated import StudentSpec
    from privdistill.models import DiffusionModel
    from site_agent.client_app import train_state

    torch.set_num_threads(1)
    local = TrainConfig(**TRAIN, steps=steps, log_every=steps, checkpoint_every=steps + 1)
    spec = StudentSpec(model=ModelConfig(**MODEL), train=local, resolution=28, channels=1, class_names=classes, seed=0)
    state = DiffusionModel.from_config(spec.model, resolution=28, channels=1, class_names=classes,
                                       seed=0).unet.state_dict()
    rng = np.random.default_rng(0)
    data = ImageSet(rng.uniform(-1, 1, (5, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, len(classes), 5),
                    class_names=classes)
    out = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        train_state(spec, state, data, 0)
        out.append(time.perf_counter() - t)
    return statistics.median(out[1:])


def one_run(label: str, src: Path, ctx: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """federate + one join per site with ``src`` first on PYTHONPATH; the time-stamped marks per site."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "PATH": str(BIN) + os.pathsep + os.environ.get("PATH", "")}
    logs = work / "logs"
    logs.mkdir(parents=True)
    port, out, procs = free_port(), work / "federated-out", []
    t0 = time.time()
    try:
        coord = Stamped([str(BIN / "privdistill-coordinator"), "federate", "--config", str(ctx["prov"].config),
                         "--training", str(ctx["training"]), "--out", str(out), "--port", str(port),
                         "--timeout", str(int(timeout))], env, logs / "federate.log")
        procs.append(coord)
        deadline = time.monotonic() + 300  # the SuperLink start and `flwr supernode register` are slow under load
        while not coord.seen("SuperLink ready"):
            if coord.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{label}: the SuperLink did not start; see {logs / 'federate.log'}")
            time.sleep(0.2)
        joins = {}
        for sid, site in ctx["sites"].items():
            joins[sid] = Stamped([str(BIN / "privdistill-site"), "join", str(site.config_path), "--workdir",
                                  str(site.workdir), "--superlink", f"127.0.0.1:{port}", "--node-key",
                                  str(ctx["prov"].site_dirs[sid] / "flower-node.key")], env, logs / f"{sid}.log")
            procs.append(joins[sid])
        rc = coord.proc.wait(timeout=timeout + 120)
        wall = time.time() - t0
    finally:
        for p in reversed(procs):
            p.stop()
    if rc != 0:
        raise SystemExit(f"{label}: federate exited with {rc}; see {logs}")
    fed = json.loads((out / "federated.json").read_text())
    marks = {sid: {name: j.times(needle) for name, needle in MARKS.items()} for sid, j in joins.items()}
    timing = {sid: [ast.literal_eval(m.group(1)) for _, line in j.lines if (m := re.search(r"timing=(\{.*?\})", line))]
              for sid, j in joins.items()}
    return {"label": label, "wall_s": round(wall, 2), "rounds_completed": fed["rounds_completed"],
            "participants": [len(r["participants"]) for r in fed["rounds"]], "marks": marks, "site_timing": timing,
            "logs": str(logs)}


def phases(run: dict[str, Any], train_s: float) -> dict[str, Any]:
    """Per site and round k (not the last): period = received(k+1) - received(k); overhead = period - train_s;
    the phases received -> ClientApp done -> reply sent -> next received."""
    rows = []
    for sid, m in run["marks"].items():
        rec, trained, sent, up = m["received"], m["trained"], m["sent"], m["clientapp_started"]
        for k in range(len(rec) - 1):
            done = next((t for t in trained if rec[k] <= t < rec[k + 1]), None)
            out = next((t for t in sent if rec[k] <= t < rec[k + 1]), None)
            started = next((t for t in up if rec[k] <= t < rec[k + 1]), None)
            if done is None or out is None or started is None:
                continue
            period = rec[k + 1] - rec[k]
            rows.append({"site": sid, "round": k + 1, "period_s": round(period, 3),
                         "overhead_s": round(period - train_s, 3),
                         # Flower logs "Start `flwr-clientapp` process" after its own imports in the new process
                         "received_to_clientapp_started_s": round(started - rec[k], 3),
                         "received_to_clientapp_done_s": round(done - rec[k], 3),
                         "clientapp_done_to_sent_s": round(out - done, 3),
                         "sent_to_next_received_s": round(rec[k + 1] - out, 3)})
    return {"rounds": rows, "median_overhead_s": round(statistics.median(r["overhead_s"] for r in rows), 3)
            if rows else None,
            "median": {key: round(statistics.median(r[key] for r in rows), 3) for key in
                       ("received_to_clientapp_started_s", "received_to_clientapp_done_s", "clientapp_done_to_sent_s",
                        "sent_to_next_received_s")}
            if rows else {}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="local training steps per round")
    p.add_argument("--runs", type=int, default=1, help="runs each way (alternating baseline and new)")
    p.add_argument("--baseline-ref", default=BASELINE_REF)
    p.add_argument("--no-baseline", action="store_true", help="only this checkout")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the Flower processes on the way out
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (a period needs two rounds)")

    root = Path(tempfile.mkdtemp(prefix="privdistill-flower-overhead-"))
    try:
        ctx = setup(root, args.rounds, args.steps)
        train_s = local_training_s(ctx["classes"], args.steps)
        print(f"local training per round (warm, in process): {train_s:.3f} s", flush=True)
        variants = [("new", ROOT)]
        if not args.no_baseline:
            variants.insert(0, ("baseline", baseline_tree(args.baseline_ref, root / "baseline-src")))
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in variants}
        failed: list[dict[str, Any]] = []
        for i in range(args.runs):
            for label, src in variants:
                try:
                    run = one_run(label, src, ctx, root / f"{label}-{i}", args.timeout)
                except SystemExit as err:  # recorded, and the other runs still count
                    print(f"{label} run {i} FAILED: {err}", flush=True)
                    failed.append({"label": label, "run": i, "error": str(err)})
                    continue
                run["phases"] = phases(run, train_s)
                runs[label].append(run)
                print(f"{label} run {i}: wall {run['wall_s']} s, median overhead per round "
                      f"{run['phases']['median_overhead_s']} s, phases {json.dumps(run['phases']['median'])}",
                      flush=True)
                for row in run["phases"]["rounds"]:
                    print("   ", json.dumps(row), flush=True)

        def pooled(label: str) -> float | None:
            vals = [r["overhead_s"] for run in runs[label] for r in run["phases"]["rounds"]]
            return round(statistics.median(vals), 3) if vals else None

        def spread(label: str) -> list[float]:
            vals = [r["overhead_s"] for run in runs[label] for r in run["phases"]["rounds"]]
            return [round(min(vals), 3), round(max(vals), 3)] if vals else []

        result: dict[str, Any] = {
            "benchmark": "flower_overhead",
            "config": {"rounds": args.rounds, "local_steps": args.steps, "runs": args.runs, "sites": len(SITES),
                       "model": MODEL, "baseline_ref": None if args.no_baseline else args.baseline_ref},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_avg_1min": os.getloadavg()[0], "note": "CPU shared with other jobs; numbers vary"},
            "local_training_s": round(train_s, 3),
            "runs": {label: [{k: v for k, v in run.items() if k != "marks"} for run in rs] for label, rs in runs.items()},
            "median_overhead_s": {label: pooled(label) for label in runs},
            "overhead_range_s": {label: spread(label) for label in runs},
            "n_periods": {label: sum(len(run["phases"]["rounds"]) for run in rs) for label, rs in runs.items()},
            "failed_runs": failed,
            "goal_overhead_s": 5.0,
        }
        if "baseline" in runs and result["median_overhead_s"]["baseline"] and result["median_overhead_s"]["new"]:
            result["ratio_new_over_baseline"] = round(result["median_overhead_s"]["new"] /
                                                      result["median_overhead_s"]["baseline"], 3)
        print(f"median per-round overhead: {json.dumps(result['median_overhead_s'])} (n = "
              f"{json.dumps(result['n_periods'])} site-rounds); ratio new/baseline "
              f"{result.get('ratio_new_over_baseline')}; goal <= 5 s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
