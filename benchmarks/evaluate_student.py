"""evaluate-student time: the code before privdistill.measure (its file at --baseline-rev, loaded from git)
vs the current code on a cold cache (first call) and on a warm one (the next call: a new student at the same
site), all in one process on the same site work directory and the same model.

The site work directory (ingest, train-teacher, train-reid, sample) is built with the pipeline's own stages
from examples/site-<size>.yaml (site-a's half of the demo patients for --size demo) in WORKDIR and reused by a
later run. The "released student" is this site's teacher model folder: the demo's student has the teacher's
architecture and sample settings (examples/coordinator-training.yaml), so the time per call is the same;
the numbers it measures are not a student's. Nothing of the student is cached: a warm call samples, runs
the membership attack, trains the TSTR classifier and measures privacy for the new model; it reuses the real-data
feature classifier, the re-id embeddings of the training set and the teacher's numbers.

Usage:
  python benchmarks/evaluate_student.py [--size tiny|demo] [--teacher-steps N] [--workdir DIR]
  writes benchmarks/results/evaluate_student_<size>.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("memorization_rate", "reid_rate", "tstr_accuracy", "mia_auc")


def site_config(size: str, teacher_steps: int | None) -> Any:
    import yaml

    from site_agent.config import SiteConfig

    raw = yaml.safe_load((ROOT / "examples" / f"site-{size}.yaml").read_text())
    if size == "demo":
        raw["data"]["partition"] = {"index": 0, "count": 2}  # site-a of the demo
    if teacher_steps is not None:
        raw["teacher"]["train"]["steps"] = teacher_steps
    raw["site"] = {"id": "bench-site", "coordinator_url": "https://127.0.0.1:9", "ca_file": "absent-ca.pem",
                   "key_file": "absent-key.pem", "production": False}
    return SiteConfig.model_validate(raw)


def baseline_module(rev: str) -> Any:
    """site_agent/student_eval.py as it was at ``rev`` (None when git cannot show it)."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:site_agent/student_eval.py"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = ROOT / ".cache" / f"student_eval_{rev}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"student_eval_{rev}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def breakdown(cfg: Any, workdir: Path, model_dir: Path) -> dict[str, float]:
    """Seconds of each part a warm call still computes for a new student."""
    from privdistill.audit.mia import comparable_nonmembers, ingest_visits, membership_auc
    from privdistill.data.types import ImageSet
    from privdistill.imaging import at_resolution
    from privdistill.measure import tstr
    from privdistill.metrics import memorization
    from privdistill.models import DiffusionModel
    from privdistill.sample import sample_dataset

    out: dict[str, float] = {}

    def t(name: str, fn: Any) -> Any:
        s = time.perf_counter()
        r = fn()
        out[name] = time.perf_counter() - s
        return r

    model = DiffusionModel.load(model_dir)
    train, test = (ImageSet.load(workdir / "ingest" / f"{n}.npz") for n in ("train", "test"))
    samples = t("sample", lambda: sample_dataset(model, cfg.sample, seed=cfg.seed + 21))
    nonmembers = comparable_nonmembers(test, ingest_visits(cfg.data, workdir / "ingest"), seed=cfg.seed)
    t("membership_attack", lambda: membership_auc(model, train, nonmembers, seed=cfg.seed))
    t("tstr", lambda: tstr(samples, test, cfg.evaluate, seed=cfg.seed + 22))
    train_a = at_resolution(train, cfg.analysis_resolution)
    t("memorization", lambda: memorization(at_resolution(samples, cfg.analysis_resolution).images, train_a,
                                           ratio=cfg.evaluate.memorization_ratio))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["tiny", "demo"], default="demo")
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--baseline-rev", default="a9be97e")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--breakdown", action="store_true", help="also time the student's own parts one by one")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from privdistill.measure import CACHE_DIR
    from privdistill.pipeline import run_pipeline
    from site_agent.student_eval import evaluate_student

    cfg = site_config(args.size, args.teacher_steps)
    workdir = args.workdir or ROOT / ".cache" / f"bench-evaluate-student-{args.size}"
    t0 = time.perf_counter()
    run_pipeline(cfg, workdir, stages=["ingest", "train-teacher", "train-reid", "sample"])
    prep_s = time.perf_counter() - t0
    model_dir = workdir / "train-teacher" / "model"
    calls: dict[str, dict[str, Any]] = {}

    def timed(name: str, fn: Any) -> None:
        t = time.perf_counter()
        rep = fn(cfg, workdir, model_dir)
        secs = time.perf_counter() - t
        calls[name] = {"seconds": secs, "student": {k: rep["student"].get(k) for k in KEYS}}
        print(f"{name}: {secs:.1f} s", flush=True)

    before = baseline_module(args.baseline_rev)
    if before is not None:
        timed("before", before.evaluate_student)
    shutil.rmtree(workdir / CACHE_DIR, ignore_errors=True)
    timed("first", evaluate_student)
    timed("cached", evaluate_student)
    base = calls.get("before", calls["first"])["seconds"]
    result = {
        "size": args.size, "teacher_steps": cfg.teacher.train.steps, "sample": cfg.sample.model_dump(mode="json"),
        "baseline": f"site_agent/student_eval.py at {args.baseline_rev}" if before is not None else "first call",
        "calls": calls,
        "ratio_first_vs_before": calls["first"]["seconds"] / base,
        "ratio_cached_vs_before": calls["cached"]["seconds"] / base,
        "ratio_cached_vs_first": calls["cached"]["seconds"] / calls["first"]["seconds"],
        "same_student_numbers": len({json.dumps(c["student"], sort_keys=True) for c in calls.values()}) == 1,
        "goal": "cached call <= 1/3 of before", "prep_seconds": prep_s, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.breakdown:
        result["breakdown_seconds"] = breakdown(cfg, workdir, model_dir)
    out = args.out or ROOT / "benchmarks" / "results" / f"evaluate_student_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_first_vs_before", "ratio_cached_vs_before",
                                              "ratio_cached_vs_first", "same_student_numbers")}, indent=2))


if __name__ == "__main__":
    main()
