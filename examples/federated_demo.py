"""Two hospitals train the student together with Flower, then the same two hospitals go the centralized
way, and the two students are compared side by side (make demo-federated).

provision -> each site runs its pipeline (auto-approval under policy) -> `privdistill-coordinator federate`
starts a SuperLink (TLS, SuperNode authentication) and both sites `privdistill-site join` it: FedAvg rounds
in which each site trains the global student on its own approved shard only -> each site measures the
federated student on its own patients -> examples/two_site_demo.py exports the same shards and trains,
evaluates and releases the centralized student -> the coordinator's utility numbers for both students."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import two_site_demo as demo

ROOT, SITES, tool = demo.ROOT, demo.SITES, demo.tool


def federated_training(size: dict[str, Path], class_names: list[str], out: Path, rounds: int) -> Path:
    """The centralized training config plus a `federated:` section with the same total local steps per site."""
    cfg = yaml.safe_load(size["training"].read_text())
    steps = int(cfg["student"]["train"]["steps"])
    cfg["federated"] = {"rounds": rounds, "local_steps": max(1, steps // rounds), "min_nodes": len(SITES),
                        "class_names": class_names, "round_timeout_s": 900}
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def approved_class_names(cfg: Path, workdir: Path, log: Path) -> list[str]:
    shards = json.loads(demo.run([tool("privdistill-site"), "shards", str(cfg), "--workdir", str(workdir), "--json"],
                                 log))
    approved = [s for s in shards if s["state"] in ("approved", "exported")]
    if not approved:
        raise demo.DemoError(f"{workdir}: no approved shard (federation needs one per site)")
    return json.loads((Path(approved[-1]["dir"]) / "manifest.json").read_text())["conditioning"]["class_names"]


def federate(work: Path, coord_cfg: Path, training: Path, configs: dict[str, Path], logs: Path) -> Path:
    """federate + one `join` per site, all real processes on 127.0.0.1; returns the output dir."""
    out, port = work / "federated-student", demo.free_port()
    env = demo.site_env(1)
    print(f"$ privdistill-coordinator federate --config {coord_cfg} --training {training} --out {out} --port {port}",
          flush=True)
    procs: list[subprocess.Popen] = []
    fed_log = logs / "federate.log"
    try:
        with open(fed_log, "ab") as fh:
            coord = subprocess.Popen([tool("privdistill-coordinator"), "federate", "--config", str(coord_cfg),
                                      "--training", str(training), "--out", str(out), "--port", str(port)],
                                     stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        procs.append(coord)
        deadline = time.time() + 120
        while "SuperLink ready" not in fed_log.read_text(errors="replace"):
            if coord.poll() is not None or time.time() > deadline:
                raise demo.DemoError(f"the SuperLink did not come up; see {fed_log}")
            time.sleep(0.3)
        for site, cfg in configs.items():
            args = [str(cfg), "--workdir", str(work / site / "work"), "--superlink", f"127.0.0.1:{port}"]
            print(f"$ privdistill-site join {' '.join(args)}", flush=True)
            with open(logs / f"{site}-join.log", "ab") as fh:
                procs.append(subprocess.Popen([tool("privdistill-site"), "join", *args], stdout=fh,
                                              stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True))
        rc = coord.wait()
        if rc != 0:
            tail = "".join(fed_log.read_text().splitlines(keepends=True)[-25:])
            raise demo.DemoError(f"privdistill-coordinator federate exited with {rc}; see {fed_log}\n{tail}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    return out


def coordinator_utility(training: Path, coord_cfg: Path, model_dir: Path) -> dict[str, Any]:
    """TSTR on the public reference set and FID-domain of a student, as `privdistill-coordinator evaluate` does."""
    from coordinator.student import load_accepted, load_training_config
    from coordinator.student_cli import _accepted
    from coordinator.student_eval import utility_report
    from privdistill.models import DiffusionModel
    from privdistill.sample import sample_dataset

    cfg = load_training_config(training)
    model = DiffusionModel.load(model_dir)
    samples = sample_dataset(model, cfg.sample, seed=cfg.seed + 3)
    pooled, _ = load_accepted(_accepted(coord_cfg)[1], resolution=cfg.resolution, channels=cfg.channels)
    return utility_report(samples, pooled, cfg)


def side_by_side(central: dict[str, Any], fed_sites: dict[str, Any], fed_coord: dict[str, Any],
                 fed: dict[str, Any]) -> None:
    f = demo._fmt
    print("\n=== centralized vs federated student ===")
    print(f"{'measure':34} {'centralized':>12} {'federated':>12}")
    for site in SITES:
        c = ((central["sites"][site].get("student_eval") or {}).get("student") or {})
        d = (fed_sites.get(site) or {}).get("student") or {}
        for key, label in (("memorization_rate", "memorization"), ("reid_rate", "re-id rate"),
                           ("tstr_accuracy", "TSTR (own test patients)")):
            print(f"{site + ' ' + label:34} {f(c.get(key)):>12} {f(d.get(key)):>12}")
    ce = central["coordinator"].get("evaluate") or {}
    for key, label in (("tstr_accuracy", "TSTR (public reference)"), ("fid_domain", "FID-domain (reference)")):
        print(f"{'coordinator ' + label:34} {f(ce.get(key)):>12} {f(fed_coord.get(key)):>12}")
    print(f"federated: {fed['rounds_completed']} rounds x {fed['student']['local_steps']} local steps, sites "
          f"{', '.join(fed['participating_sites'])}, {len(fed['refusals'])} refusal(s); only weight updates "
          "trained on approved filtered synthetic shards crossed the network")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "demo-work-federated")
    ap.add_argument("--size", choices=sorted(demo.SIZES), default="demo")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    work = args.workdir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    size, prov = demo.SIZES[args.size], work / "provision"
    coord_cfg = prov / "coordinator" / "coordinator.yaml"
    t0 = time.time()
    try:
        if not coord_cfg.is_file():
            demo.run([tool("privdistill-coordinator"), "provision", "--sites", ",".join(SITES), "--out", str(prov),
                      "--host", "127.0.0.1", "--port", str(demo.free_port())], logs / "coordinator.log")
        configs = {site: demo.write_site_config(size["site"], prov / site, i, work / site / "site.yaml")
                   for i, site in enumerate(SITES)}
        demo.run_per_site("run", {s: [str(c), "--workdir", str(work / s / "work")] for s, c in configs.items()},
                          logs, parallel=True)
        names = approved_class_names(configs[SITES[0]], work / SITES[0] / "work", logs / f"{SITES[0]}.log")
        training = federated_training(size, names, work / "federated-training.yaml", args.rounds)
        out = federate(work, coord_cfg, training, configs, logs)
        # each site checks the federated student on its own patients, both at once (one core each)
        demo.run_per_site("evaluate-student", {s: [str(c), str(out), "--workdir", str(work / s / "work")]
                                               for s, c in configs.items()}, logs, parallel=True)
        fed_sites = {site: json.loads((work / site / "work" / "student-eval" / "report.json").read_text())
                     for site in configs}
        (work / "federated-site-evals.json").write_text(json.dumps(fed_sites, indent=2))
        if demo.main(["--workdir", str(work), "--size", args.size]) != 0:  # export + centralized student
            raise demo.DemoError("the centralized part failed (see above)")
        from privdistill.logs import configure_logging

        configure_logging("console", "warning")  # the in-process evaluation below logs at debug otherwise
        fed_coord = coordinator_utility(training, coord_cfg, out / "model")
    except demo.DemoError as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    central = json.loads((work / "summary.json").read_text())
    fed = json.loads((out / "federated.json").read_text())
    (work / "federated-summary.json").write_text(json.dumps(
        {"federated": fed, "federated_site_evals": fed_sites, "federated_coordinator": fed_coord,
         "centralized": central, "seconds": round(time.time() - t0, 1)}, indent=2, default=str))
    side_by_side(central, fed_sites, fed_coord, fed)
    print(f"total {time.time() - t0:.0f} s; summary in {work / 'federated-summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
