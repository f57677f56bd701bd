"""Sampling solvers at the demo model: DDIM at the demo's steps vs DPM-Solver++ / UniPC at half the model
evaluations (add ddim:10 to --arms for DDIM at that same half budget), on domain FID, TSTR accuracy and time.

The teacher is the demo's (examples/site-demo.yaml, site-a's half of the Fashion-MNIST patients), trained
here through the pipeline's own ingest and train-teacher stages in WORKDIR (resumable; the stage records
make a second run reuse it). Every arm starts from the same noise (same seed), so the comparison is paired.

- domain FID: Fréchet distance of the evaluate stage's feature classifier (trained on the real training
  images, evaluate.classifier_steps, seed + 11) between the real test set and the arm's samples; 95%
  interval by bootstrap over samples, and a paired bootstrap interval of the difference to DDIM (the same
  resampled indices for both arms: each index is the same starting noise and class).
- TSTR: a classifier trained on the arm's samples (evaluate.classifier_steps, seed + 12, the same seed for
  every arm), tested on the real test set; Clopper-Pearson interval over the n test images, and a paired
  bootstrap interval over test images of the difference to DDIM.
- time: wall seconds of the arm's sampling in this process (one thread), as a ratio to DDIM's.

Decision rule, fixed before the first run: a solver "holds" when neither interval of its difference to the
DDIM baseline shows it worse (FID difference interval's lower end <= 0, TSTR difference interval's upper
end >= 0) at <= 1/2 of DDIM's model evaluations; it becomes the default only if it holds.

Second question, registered 2026-12-02 before its run (after the first runs: ddim:20 vs dpmpp:10 failed the
rule at the fully trained teacher while dpmpp:15/20 beat ddim:20, so the question is informed by them and is
reported as such): the LIBRARY default is DDIM 50 (config.SampleConfig); with --arms
ddim:50,dpmpp:25,unipc:25 the same rule decides it. If dpmpp:25 holds it becomes the library default; else
unipc:25 if it holds; else DDIM 50 stays.

Usage:
  python benchmarks/sampling.py [--workdir .cache/bench-sampling] [--arms ddim:20,dpmpp:10,unipc:10]
  writes benchmarks/results/sampling.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
BOOT = 1000


def demo_config(teacher_steps: int | None = None) -> Any:
    import yaml

    from privdistill.config import parse_config

    raw = yaml.safe_load((ROOT / "examples" / "site-demo.yaml").read_text())
    raw["data"]["partition"] = {"index": 0, "count": 2}  # site-a of the demo
    if teacher_steps is not None:  # a shorter teacher training than the demo's (stated in the results)
        raw["teacher"]["train"]["steps"] = teacher_steps
    return parse_config(raw, base_dir=ROOT / "examples")


def paired_boot_diff(a: Any, b: Any, stat: Any, n: int, seed: int) -> dict[str, Any]:
    """stat(a) - stat(b) with a 95% percentile interval; a and b resampled with the same indices."""
    import numpy as np

    rng = np.random.default_rng(seed)
    diffs, sa, sb = [], [], []
    for _ in range(BOOT):
        idx = rng.integers(0, n, n)
        va, vb = stat(a, idx), stat(b, idx)
        sa.append(va)
        sb.append(vb)
        diffs.append(va - vb)
    pct = [2.5, 97.5]
    return {"diff": float(stat(a, np.arange(n)) - stat(b, np.arange(n))),
            "diff_ci95": [float(x) for x in np.percentile(diffs, pct)],
            "a_ci95": [float(x) for x in np.percentile(sa, pct)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-sampling")
    ap.add_argument("--arms", default="ddim:20,dpmpp:10,unipc:10")
    ap.add_argument("--teacher-steps", type=int, default=None,
                    help="train the teacher this many steps instead of the demo's (a loaded machine)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sampling.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from privdistill.audit.stats import clopper_pearson
    from privdistill.classifier import features, predict, train_classifier
    from privdistill.data.types import ImageSet
    from privdistill.metrics import fid_domain
    from privdistill.models import DiffusionModel
    from privdistill.pipeline import run_pipeline
    from privdistill.sample import sample_dataset

    cfg = demo_config(args.teacher_steps)
    t0 = time.perf_counter()
    run_pipeline(cfg, args.workdir, stages=["ingest", "train-teacher"])
    prep_s = time.perf_counter() - t0
    train = ImageSet.load(args.workdir / "ingest" / "train.npz")
    test = ImageSet.load(args.workdir / "ingest" / "test.npz")
    teacher = DiffusionModel.load(args.workdir / "train-teacher" / "model")
    ev = cfg.evaluate
    k = len(test.class_names)
    assert train.labels is not None and test.labels is not None  # the demo data is labelled
    feat_clf = train_classifier(train.images, train.labels, k, steps=ev.classifier_steps,
                                batch_size=ev.classifier_batch_size, seed=cfg.seed + 11)
    real_feats = features(feat_clf, test.images)

    arms: dict[str, dict[str, Any]] = {}
    for arm in args.arms.split(","):
        solver, steps = arm.split(":")
        scfg = cfg.sample.model_copy(update={"solver": solver, "steps": int(steps)})
        t = time.perf_counter()
        samples = sample_dataset(teacher, scfg, seed=cfg.seed + 2)
        secs = time.perf_counter() - t
        assert samples.labels is not None  # class-conditional teacher
        clf = train_classifier(samples.images, samples.labels, k, steps=ev.classifier_steps,
                               batch_size=ev.classifier_batch_size, seed=cfg.seed + 12)
        correct = (predict(clf, test.images) == test.labels).astype(np.float64)
        arms[arm] = {"solver": solver, "steps": int(steps), "model_evaluations_per_sample": int(steps),
                     "seconds": secs, "feats": features(feat_clf, samples.images), "correct": correct,
                     "n_samples": len(samples)}
        print(f"{arm}: {secs:.1f} s, TSTR {correct.mean():.3f}", flush=True)

    def fid_at(f: Any, idx: Any) -> float:
        return fid_domain(real_feats, f[idx])

    def acc_at(c: Any, idx: Any) -> float:
        return float(c[idx].mean())

    base_key = args.arms.split(",")[0]
    base = arms[base_key]
    rows = []
    for i, (key, a) in enumerate(arms.items()):
        fid = paired_boot_diff(a["feats"], base["feats"], fid_at, len(a["feats"]), seed=100 + i)
        acc = paired_boot_diff(a["correct"], base["correct"], acc_at, len(a["correct"]), seed=200 + i)
        n_test, k_ok = len(a["correct"]), int(a["correct"].sum())
        row = {
            "arm": key, "solver": a["solver"], "steps": a["steps"], "n_samples": a["n_samples"],
            "model_evaluations_ratio": a["steps"] / base["steps"],
            "fid_domain": fid_at(a["feats"], np.arange(len(a["feats"]))), "fid_ci95": fid["a_ci95"],
            "fid_diff_vs_base": fid["diff"], "fid_diff_ci95": fid["diff_ci95"],
            "tstr_accuracy": k_ok / n_test, "tstr_ci95": clopper_pearson(k_ok, n_test), "n_test": n_test,
            "tstr_diff_vs_base": acc["diff"], "tstr_diff_ci95": acc["diff_ci95"],
            "seconds": a["seconds"], "time_ratio_vs_base": a["seconds"] / base["seconds"],
        }
        row["holds"] = (key != base_key and row["model_evaluations_ratio"] <= 0.5
                        and row["fid_diff_ci95"][0] <= 0 and row["tstr_diff_ci95"][1] >= 0)
        rows.append(row)
    result = {"baseline": base_key, "rows": rows, "config": "examples/site-demo.yaml (site-a half), teacher "
              f"trained {cfg.teacher.train.steps} steps",
              "sample": cfg.sample.model_dump(mode="json"), "classifier_steps": ev.classifier_steps,
              "bootstrap": BOOT, "prep_seconds": prep_s, "threads": torch.get_num_threads(),
              "machine": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))


def render(result: dict[str, Any]) -> str:
    def ci(v: list[float] | None, f: str = ".3f") -> str:
        return "—" if v is None else f"[{v[0]:{f}}, {v[1]:{f}}]"

    lines = [
        "# Sampling solvers at the demo teacher",
        "",
        f"Teacher: {result['config']}; sample settings {result['sample']}; baseline `{result['baseline']}`; "
        f"{result['threads']} thread(s), {result['machine']}, torch {result['torch']}, {result['when']}.",
        f"FID: domain FID (evaluate's real-data feature classifier), 95% bootstrap ({result['bootstrap']}) "
        "interval; TSTR: Clopper-Pearson over the n real test images; differences to the baseline with paired "
        "bootstrap intervals. Rule (fixed before the run): holds = <= 1/2 the model evaluations, FID difference "
        "interval reaches <= 0 and TSTR difference interval reaches >= 0.",
        "",
        "| arm | NFE ratio | n samples | domain FID [95%] | ΔFID vs base [95%] | TSTR (n test) [95%] | ΔTSTR [95%] "
        "| time s | time ratio | holds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['arm']} | {r['model_evaluations_ratio']:.2f} | {r['n_samples']} | {r['fid_domain']:.2f} "
            f"{ci(r['fid_ci95'], '.2f')} | {r['fid_diff_vs_base']:+.2f} {ci(r['fid_diff_ci95'], '+.2f')} | "
            f"{r['tstr_accuracy']:.3f} ({r['n_test']}) {ci(r['tstr_ci95'])} | {r['tstr_diff_vs_base']:+.3f} "
            f"{ci(r['tstr_diff_ci95'], '+.3f')} | {r['seconds']:.1f} | {r['time_ratio_vs_base']:.2f} | "
            f"{'yes' if r['holds'] else ('baseline' if r['arm'] == result['baseline'] else 'no')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
