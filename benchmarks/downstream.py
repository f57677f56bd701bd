"""Downstream utility when labels are scarce: CNN (all labels) vs ViT (10% labels) vs Semi-ViT (10% labels +
the rest unlabelled), each trained on real, teacher-synthetic and student-synthetic images of the headline
benchmark (benchmarks/configs/privacy_utility.yaml) and tested on its real test set; 95% t-intervals over seeds.

The teacher and student samples come from a headline work directory (the one benchmarks/privacy_utility.py
writes): real train/test from ingest/, the teacher's samples from sample/samples.npz (unfiltered, as the
report's teacher TSTR), the student's from evaluate/student_samples.npz, or, when the evaluate stage has
not run, drawn from train-student/model with the evaluate stage's own seed (the same images). Missing
stages are run first (ingest .. train-student, ~15 min of compute on one core; resumable).

Each seed draws its own labelled split and model init; ViT and Semi-ViT share the split, the init and the
supervised stage for a seed, so their difference is paired. Every classifier uses the library defaults
(privdistill.config.DownstreamConfig; the CNN: the headline config's evaluate.classifier_steps), fixed
before this benchmark was run.

Usage:
  .venv/bin/python benchmarks/downstream.py [--workdir DIR] [--seeds 5]     # writes results/downstream.{json,md}
  .venv/bin/python benchmarks/downstream.py --render results/downstream.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("cnn", "vit", "semi_vit")
SOURCES = ("real", "teacher", "student")
LABELS = {"cnn": "CNN, all labels", "vit": "ViT, 10% labels", "semi_vit": "Semi-ViT, 10% labels + rest unlabelled"}


def t_interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval over seeds."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2 or float(v.std(ddof=1)) == 0.0:
        return {"mean": m, "ci95": [m, m], "n": len(v)}
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=m, scale=stats.sem(v))
    return {"mean": m, "ci95": [float(lo), float(hi)], "n": len(v)}


def load_sets(workdir: Path, cfg, sources: list[str]) -> dict:
    """Real train/test and the teacher's and student's samples of a headline work directory."""
    import json as _json

    from privdistill.data.types import ImageSet

    sets = {"real": ImageSet.load(workdir / "ingest" / "train.npz"),
            "test": ImageSet.load(workdir / "ingest" / "test.npz")}
    if "teacher" in sources:
        sets["teacher"] = ImageSet.load(workdir / "sample" / "samples.npz")
    student_npz = workdir / "evaluate" / "student_samples.npz"
    if "student" not in sources:
        pass
    elif student_npz.is_file():
        sets["student"] = ImageSet.load(student_npz)
    else:
        from privdistill.models import DiffusionModel
        from privdistill.sample import sample_dataset

        sdir = workdir / "train-student"
        prompts = sdir / "prompts.json"
        sets["student"] = sample_dataset(DiffusionModel.load(sdir / "model"), cfg.sample, seed=cfg.seed + 3,
                                         prompt_labels=_json.loads(prompts.read_text()) if prompts.is_file() else None)
    return sets


def run_one(model: str, train, test, n_classes: int, cfg, seed: int) -> dict:
    from privdistill.classifier import accuracy, train_classifier
    from privdistill.config import DownstreamConfig
    from privdistill.downstream import downstream_accuracy

    t0 = time.process_time()
    if model == "cnn":
        clf = train_classifier(train.images, train.labels, n_classes, steps=cfg.evaluate.classifier_steps,
                               batch_size=cfg.evaluate.classifier_batch_size, seed=seed)
        out = {"accuracy": accuracy(clf, test.images, test.labels), "n_labelled": len(train)}
    else:
        out = downstream_accuracy(train.images, train.labels, test.images, test.labels, n_classes,
                                  DownstreamConfig(model=model), seed=seed)
    return {**out, "cpu_s": round(time.process_time() - t0, 1)}


def summarise(runs: list[dict]) -> dict:

    def by(src: str, m: str) -> list[float]:
        return [r["accuracy"] for r in runs if r["source"] == src and r["model"] == m]

    out = {}
    for src in SOURCES:
        s = {m: t_interval(by(src, m)) for m in MODELS if by(src, m)}
        if by(src, "semi_vit") and by(src, "vit"):
            s["semi_vit_minus_vit"] = t_interval([a - b for a, b in zip(by(src, "semi_vit"), by(src, "vit"), strict=True)])
        if by(src, "semi_vit") and by(src, "cnn"):
            s["semi_vit_minus_cnn"] = t_interval([a - b for a, b in zip(by(src, "semi_vit"), by(src, "cnn"), strict=True)])
        pl = [r for r in runs if r["source"] == src and r["model"] == "semi_vit"]
        if not s:
            continue
        if pl:
            s["pseudo_label_rate"] = t_interval([r["pseudo_label_rate"] for r in pl])
            s["pseudo_label_accuracy"] = t_interval([r["pseudo_label_accuracy"] for r in pl
                                                     if r.get("pseudo_label_accuracy") is not None])
        out[src] = s
    return out


def _ci(s: dict, pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:.3f}")
    return f"{f(s['mean'])} [{f(s['ci95'][0])}, {f(s['ci95'][1])}]"


def render_md(res: dict) -> str:
    sm, n = res["summary"], res["seeds"]
    lines = [
        "# Downstream accuracy with few labels: CNN vs ViT vs Semi-ViT",
        "",
        f"Data: the headline benchmark's work directory ({res['data']}). Test: the real test set "
        f"(n={res['n_test']}). Mean accuracy over {n} seeds [95% t-interval over seeds; the test set is fixed].",
        "",
        "| trained on | " + " | ".join(LABELS[m] for m in MODELS) + " | Semi-ViT − ViT (pp) | Semi-ViT − CNN (pp) |",
        "|---|" + "---:|" * (len(MODELS) + 2),
    ]
    for src in SOURCES:
        if src not in sm:
            lines.append(f"| {src} ({res['n_train'][src]} images) | not run |" + " |" * (len(MODELS) + 1))
            continue
        s = sm[src]
        lines.append(f"| {src} ({res['n_train'][src]} images) | " + " | ".join(_ci(s[m]) for m in MODELS)
                     + f" | {_ci(s['semi_vit_minus_vit'], True)} | {_ci(s['semi_vit_minus_cnn'], True)} |")
    lines += ["", "Semi-ViT's pseudo-labels (EMA teacher, confidence ≥ "
              f"{res['downstream_config']['confidence_threshold']}): share of unlabelled images accepted / accepted that are right:", ""]
    for src in (x for x in SOURCES if x in sm):
        s = sm[src]
        lines.append(f"- {src}: {_ci(s['pseudo_label_rate'])} / {_ci(s['pseudo_label_accuracy'])}")
    wall = "n/a (sources run as parallel processes)" if res["wall_s"] is None else f"{res['wall_s'] / 60:.1f} min"
    lines += ["", f"Compute: {res['total_cpu_s'] / 60:.1f} CPU-min, wall {wall}, torch threads "
              f"{res['environment']['torch_threads']} (load average at end {res['environment']['loadavg_at_end'][0]:.1f}).",
              "", "Reproduce: `" + res["command"] + "`", ""]
    if res.get("notes"):
        lines += ["Notes:", ""] + [f"- {x}" for x in res["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "configs" / "privacy_utility.yaml")
    ap.add_argument("--workdir", type=Path, default=None, help="default: /tmp/privdistill-bench/<config name>")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES),
                    help="training sets to run now (default all; finished runs are resumed from a partial file)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON", help="only re-render the markdown")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--merge", type=Path, nargs="+", default=[], metavar="PARTIAL_JSON",
                    help="only summarise the finished runs in these partial files (e.g. sources run in parallel "
                         "with separate --out-dir) into --out-dir/downstream.{json,md}; sources without runs are "
                         "reported as not run")
    a = ap.parse_args(argv)
    if a.render is not None:
        res = json.loads(a.render.read_text())
        if a.note:
            res["notes"] = a.note
            a.render.write_text(json.dumps(res, indent=2) + "\n")
        md = render_md(res)
        a.render.with_suffix(".md").write_text(md)
        print(md)
        return 0
    if a.seeds < 2:
        ap.error("--seeds must be at least 2 for an interval")

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    from privdistill.config import load_config
    from privdistill.logs import configure_logging
    from privdistill.pipeline import STAGES, run_pipeline

    configure_logging("console", "info")
    cfg = load_config(a.config)
    workdir = a.workdir or Path("/tmp/privdistill-bench") / cfg.name
    if a.merge:
        runs = [r for f in a.merge for r in json.loads(f.read_text()) if r["seed"] < a.seeds]
        return write_results(runs, a, cfg, workdir, None)
    t0 = time.time()
    needs = {"real": ("ingest", "ingest/train.npz"), "teacher": ("sample", "sample/samples.npz"),
             "student": ("train-student", "train-student/model")}
    missing = [needs[s][0] for s in a.sources if not (workdir / needs[s][1]).exists()]
    if missing:  # run (or resume) the headline pipeline up to the last stage needed
        last = max(STAGES.index(m) for m in missing)
        run_pipeline(cfg, workdir, stages=list(STAGES[: last + 1]))
    sets = load_sets(workdir, cfg, a.sources)
    test, n_classes = sets["test"], len(sets["test"].class_names)
    # finished runs are kept in a partial file, so an interrupted benchmark resumes where it stopped
    a.out_dir.mkdir(parents=True, exist_ok=True)
    partial = a.out_dir / "downstream.partial.json"
    runs = json.loads(partial.read_text()) if partial.is_file() else []
    done = {(r["source"], r["model"], r["seed"]) for r in runs}
    for src in a.sources:
        for seed in range(a.seeds):
            for model in MODELS:
                if (src, model, seed) in done:
                    continue
                r = run_one(model, sets[src], test, n_classes, cfg, seed)
                runs.append({"source": src, "model": model, "seed": seed, **r})
                partial.write_text(json.dumps(runs, indent=1) + "\n")
                print(f"seed {seed} {src:8s} {model:9s} accuracy {r['accuracy']:.3f} ({r['cpu_s']} CPU-s)", flush=True)
    if set(a.sources) != set(SOURCES):
        print(f"partial run ({', '.join(a.sources)}) kept in {partial}; run again with all sources to finish")
        return 0
    runs = [r for r in runs if r["seed"] < a.seeds]
    code = write_results(runs, a, cfg, workdir, time.time() - t0)
    partial.unlink()
    return code


def n_images(workdir: Path, cfg) -> dict:
    """Training-set sizes: real and teacher from the work directory, the student's from its sample config."""
    import numpy as np

    with np.load(workdir / "ingest" / "test.npz") as t:
        n_test, n_classes = len(t["images"]), len(set(t["labels"].tolist()))
    n = {"test": n_test}
    for src, rel in (("real", "ingest/train.npz"), ("teacher", "sample/samples.npz")):
        with np.load(workdir / rel) as z:
            n[src] = len(z["images"])
    n["student"] = cfg.sample.per_class * n_classes
    return n


def write_results(runs: list[dict], a, cfg, workdir: Path, wall_s: float | None) -> int:
    import torch

    from privdistill.config import DownstreamConfig

    cmd = f".venv/bin/python benchmarks/downstream.py --workdir {workdir} --seeds {a.seeds} --threads {a.threads}"
    if a.config != HERE / "configs" / "privacy_utility.yaml":
        cmd += f" --config {a.config}"
    d, n = cfg.data, n_images(workdir, cfg)
    res = {
        "config_path": str(a.config.resolve().relative_to(HERE.parent)) if a.config.resolve().is_relative_to(HERE.parent) else str(a.config),
        "data": f"{cfg.name}: Fashion-MNIST classes {d.classes}, {d.resolution}x{d.resolution}, "
                f"{d.max_per_class} patients/class x {d.visits.count if d.visits else 1} visits",
        "seeds": a.seeds, "n_test": n["test"], "n_train": {s: n[s] for s in SOURCES},
        "downstream_config": DownstreamConfig().model_dump(mode="json"),
        "cnn": {"steps": cfg.evaluate.classifier_steps, "batch_size": cfg.evaluate.classifier_batch_size},
        "summary": summarise(runs), "runs": runs, "command": cmd,
        "total_cpu_s": round(sum(r["cpu_s"] for r in runs), 1),
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version(), "cpu_count_visible": os.cpu_count(),
                        "loadavg_at_end": list(os.getloadavg())},
        **({"notes": a.note} if a.note else {}),
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = a.out_dir / "downstream.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)
    md = render_md(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
