"""LiRA beside the loss attack, on the headline experiment's teacher and student.

Reuses a privacy_utility config (default benchmarks/configs/privacy_utility.yaml) and its work
directory: runs the pipeline there if needed (stages already current are skipped), then attacks

  - the teacher, with shadow teachers trained (same config) on paired random halves of the pool of
    member and non-member patients (privdistill.audit.lira);
  - with --student, the distilled student, with shadow *distillations*: each shadow teacher is sampled
    (the run's sample config) and a shadow student is trained on its samples. The shadows skip the
    re-identification filter (cost); the target student was trained on filtered samples, so the
    shadows over-estimate what leaks and the attack is, if anything, mis-calibrated towards members.

Prints and writes benchmarks/results/mia_lira.{json,md} (or --out-dir): AUC with the patient-level
95% interval, TPR at 1% / 0.1% FPR where the non-member count allows, n, for LiRA (online and
offline) and for the loss attack on the same patients.

Usage:
  .venv/bin/python benchmarks/mia_lira.py --shadows 4 --threads 1            # teacher only
  .venv/bin/python benchmarks/mia_lira.py --shadows 4 --threads 1 --student  # and the student
  .venv/bin/python benchmarks/mia_lira.py --quick --shadows 2                # smoke test, minutes
Cost: every shadow trains one teacher of the config (and, with --student, samples it and trains one
student): 4 shadows at the headline config are ~4x the headline's teacher + student time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS, RESULTS = HERE / "configs", HERE / "results"
NOTE = ("Shadow students skip the filter (see benchmarks/mia_lira.py's docstring). With few shadows the Gaussian fits "
        "use one pooled variance. AUC intervals resample patients; TPR at an FPR below 1/(non-member patients) cannot "
        "be measured and is reported as n/a.")


def _row(name: str, r: dict) -> str:
    def tpr(f: str) -> str:
        v = r["tpr_at_fpr"][f]
        return "n/a (needs more non-members)" if v["tpr"] is None else f"{v['tpr']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"

    return (f"| {name} | {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | "
            f"{r['n_member_units']}/{r['n_nonmember_units']} | {tpr('0.01')} | {tpr('0.001')} |")


def run_lira(cfg, workdir: Path, *, n_shadows: int, student: bool) -> dict:
    """LiRA on the run in ``workdir`` (the pipeline is run there first; stages already current are skipped): the
    teacher with ``n_shadows`` shadow teachers and, with ``student``, the distilled student with as many shadow
    distillations. Returns {"teacher": summary, "student": summary} (privdistill.audit.lira.lira_attack's)."""
    from privdistill.audit.lira import lira_attack
    from privdistill.audit.mia import balanced, comparable_nonmembers, ingest_visits
    from privdistill.data.types import ImageSet
    from privdistill.models import DiffusionModel
    from privdistill.pipeline import STAGES, run_pipeline
    from privdistill.sample import sample_dataset
    from privdistill.seeds import derive_seed
    from privdistill.train import train_diffusion
    from privdistill.workdir import INGEST, MODEL_DIR, TRAIN_STUDENT, TRAIN_TEACHER, WorkDir

    if cfg.privacy is not None and cfg.privacy.dp is not None:
        print("note: the target teacher is DP-trained; the shadows are not (their training would be charged to the "
              "site's privacy ledger), so the attack is calibrated on non-DP models")
    run_pipeline(cfg, workdir, stages=list(STAGES) if student else [INGEST, TRAIN_TEACHER])
    wd = WorkDir(workdir)
    train, test = ImageSet.load(wd.train_set), ImageSet.load(wd.test_set)
    nonmembers = comparable_nonmembers(test, ingest_visits(cfg.data, wd.stage(INGEST)), seed=cfg.seed)
    members, nonmembers = balanced(train, nonmembers, seed=cfg.seed)

    def new_model(dcfg, data: ImageSet, seed: int) -> DiffusionModel:
        return DiffusionModel.from_config(dcfg.model, resolution=cfg.data.resolution, channels=cfg.data.channels,
                                          class_names=data.class_names, prompts=data.prompts, seed=seed)

    def shadow_teacher(data: ImageSet, seed: int) -> DiffusionModel:
        model = new_model(cfg.teacher, data, seed)
        train_diffusion(model, data, cfg.teacher.train, seed=seed)
        return model

    def shadow_student(data: ImageSet, seed: int) -> DiffusionModel:
        samples = sample_dataset(shadow_teacher(data, seed), cfg.sample, seed=derive_seed(seed, "teacher-samples"))
        student_seed = derive_seed(seed, "student-train")
        model = new_model(cfg.student_config, samples, student_seed)
        train_diffusion(model, samples, cfg.student_config.train, seed=student_seed)
        return model

    results = {"teacher": lira_attack(DiffusionModel.load(wd.teacher_model), members, nonmembers,
                                      train_shadow=shadow_teacher, n_shadows=n_shadows, seed=cfg.seed)}
    if student:
        results["student"] = lira_attack(DiffusionModel.load(wd.stage(TRAIN_STUDENT) / MODEL_DIR), members,
                                         nonmembers, train_shadow=shadow_student, n_shadows=n_shadows,
                                         seed=cfg.seed)
    return results


def render_table(results: dict) -> list[str]:
    """LiRA (online, offline) and the loss attack on the same patients, per target: markdown table lines."""
    lines = ["| target / attack | AUC [95% CI, patient bootstrap] | n member/non-member patients | TPR @ 1% FPR | "
             "TPR @ 0.1% FPR |", "|---|---|---|---|---|"]
    for target, r in results.items():
        lines += [_row(f"{target} / LiRA online", r["online"]), _row(f"{target} / LiRA offline", r["offline"]),
                  _row(f"{target} / loss attack", r["loss_attack_same_units"])]
    return lines


def render_md(res: dict) -> str:
    lines = [f"# LiRA vs the loss attack: {res['config']}", "",
             f"Run {res['finished_at']}, {res['n_shadows']} shadows, {res['seconds'] / 60:.1f} min on "
             f"{res['threads']} thread(s).", "", *render_table(res["results"])]
    return "\n".join(lines + ["", res["note"], ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="default: configs/privacy_utility.yaml (--quick: _quick)")
    ap.add_argument("--quick", action="store_true", help="the quick config: proves the script end to end")
    ap.add_argument("--workdir", type=Path, default=None, help="default: /tmp/privdistill-bench/<config name>")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results (full) or the workdir")
    ap.add_argument("--shadows", type=int, default=4, help="shadow models, even (default 4; the paper uses 16+)")
    ap.add_argument("--student", action="store_true", help="attack the distilled student too (shadow distillations)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from privdistill.config import load_config
    from privdistill.logs import configure_logging

    configure_logging("console", "info")
    cfg_path = a.config or CONFIGS / ("privacy_utility_quick.yaml" if a.quick else "privacy_utility.yaml")
    cfg = load_config(cfg_path)
    workdir = a.workdir or Path("/tmp/privdistill-bench") / cfg.name
    out_dir = a.out_dir or (workdir if a.quick else RESULTS)
    t0 = time.time()
    results = run_lira(cfg, workdir, n_shadows=a.shadows, student=a.student)
    res = {
        "config": str(cfg_path.relative_to(HERE.parent) if cfg_path.is_relative_to(HERE.parent) else cfg_path),
        "n_shadows": a.shadows, "threads": a.threads, "seconds": round(time.time() - t0, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results,
        "note": NOTE,
        "torch": torch.__version__, "numpy": np.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mia_lira.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = render_md(res)
    (out_dir / "mia_lira.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
