"""Headline experiment: does Privacy Distillation remove memorization while keeping utility?

Runs the whole pipeline (ingest -> train-teacher / train-reid -> sample -> filter -> train-student
-> evaluate) with ``privdistill.pipeline.run_pipeline`` on a config from benchmarks/configs/, then
writes the teacher-vs-student table: memorization_rate, reid_rate, tstr_accuracy, fid_domain;
the real-data TRTR reference; the filter's kept/dropped counts; and, computed here with the same
independent pixel criterion (`privdistill.metrics.memorization`), how many of the teacher's
memorized samples the filter let through (the filter's recall on known copies).

The benchmark is calibrated so that the teacher demonstrably memorizes on 2 CPU cores: a tiny
training set (3 classes x 10 patients x 4 near-identical visits, 16x16), many steps relative to
the data. See benchmarks/configs/privacy_utility.yaml for the reasoning.

Usage:
  .venv/bin/python benchmarks/privacy_utility.py            # full run (~30 min on 2 shared cores)
  .venv/bin/python benchmarks/privacy_utility.py --quick    # a few minutes; proves it works end to end
Full runs write benchmarks/results/privacy_utility.{json,md}; --quick writes into its workdir
unless --out-dir is given. Stages already done in --workdir are skipped (resume); --force re-runs.
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
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
GOALS = {
    "teacher_memorization_rate_min_exclusive": 0.0,
    "student_over_teacher_memorization_max": 0.1,
    "student_over_teacher_tstr_min": 0.9,
}


def _fmt(v, nd=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _ci(ci) -> str:
    """' [lo, hi]' for a 95% interval, '' when the report has none (runs before intervals were added)."""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _n(n) -> str:
    return f", n = {n[0]}/{n[1]} patients" if isinstance(n, (list, tuple)) and len(n) == 2 else ""


def filter_recall(workdir: Path, ratio: float) -> dict:
    """Memorized teacher samples (pixel criterion) and how many of them survive the filter."""
    import numpy as np

    from privdistill.data.types import ImageSet
    from privdistill.metrics import memorization

    train = ImageSet.load(workdir / "ingest" / "train.npz")
    samples = ImageSet.load(workdir / "sample" / "samples.npz")
    kept = ImageSet.load(workdir / "filter" / "kept.npz")
    m_all = memorization(samples.images, train, ratio=ratio)
    m_kept = memorization(kept.images, train, ratio=ratio) if len(kept) else {"count": 0, "rate": 0.0}
    n_mem, n_leak = int(m_all["count"]), int(m_kept["count"])
    distinct = len(np.unique(train.patient_ids[m_all["nearest_index"][m_all["memorized"]]])) if n_mem else 0
    return {
        "teacher_samples": len(samples),
        "teacher_memorized": n_mem,
        "teacher_memorized_distinct_patients": distinct,
        "train_patients": int(len(np.unique(train.patient_ids))) if train.patient_ids is not None else None,
        "kept": len(kept),
        "memorized_in_kept": n_leak,
        "memorization_rate_in_kept": float(m_kept["rate"]),
        "filter_recall_on_memorized": None if n_mem == 0 else round(1 - n_leak / n_mem, 4),
    }


def summary_row(res: dict) -> dict:
    """One line of the comparison table from a results JSON."""
    r, fc = res["report"], res.get("filter_check") or {}
    return {
        "config": res["config_path"], "name": res["config_name"],
        "target_tpr": res["config"]["reid"]["target_tpr"], "patients_per_class": res["config"]["data"]["max_per_class"],
        "teacher_mem": r["teacher"]["memorization_rate"], "student_mem": r["student"]["memorization_rate"],
        "teacher_reid": r["teacher"]["reid_rate"], "student_reid": r["student"]["reid_rate"],
        "teacher_tstr": r["teacher"]["tstr_accuracy"], "student_tstr": r["student"]["tstr_accuracy"],
        "trtr": r["real"]["trtr_accuracy"], "kept": r["filter"]["kept"], "dropped": r["filter"]["dropped"],
        "copies_leaked": fc.get("memorized_in_kept"), "copies": fc.get("teacher_memorized"),
        "teacher_mia": r["teacher"].get("mia_auc"), "student_mia": r["student"].get("mia_auc"),
        "teacher_fid": r["teacher"].get("fid_domain"), "student_fid": r["student"].get("fid_domain"),
        "epsilon": (r.get("teacher_dp") or {}).get("epsilon"), "delta": (r.get("teacher_dp") or {}).get("delta"),
        "noise_multiplier": (r.get("teacher_dp") or {}).get("noise_multiplier"),
    }


def render_dp_table(rows: list[dict]) -> list[str]:
    """Teacher and distilled student of each run side by side: the privacy evidence next to the utility."""
    lines = [
        "| run | model | DP ε (δ) | memorization_rate | MIA AUC | tstr_accuracy | fid_domain |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for o in rows:
        eps = "no DP" if o.get("epsilon") is None else f"{o['epsilon']:.2f} ({o['delta']:.1e}), σ {o['noise_multiplier']:.2f}"
        for who in ("teacher", "student"):
            lines.append(
                f"| `{o['config']}` | {who if who == 'teacher' else 'student (distilled)'} | "
                f"{eps if who == 'teacher' else '-'} | {_fmt(o[who + '_mem'])} | {_fmt(o.get(who + '_mia'))} | "
                f"{_fmt(o[who + '_tstr'])} | {_fmt(o.get(who + '_fid'), 1)} |"
            )
    return lines


def render_md(res: dict) -> str:
    r, g = res["report"], res["goals"]
    t, s = r["teacher"], r["student"]
    fr = res.get("filter_check") or {}
    lines = [
        f"# Privacy Distillation benchmark — `{res['config_name']}`",
        "",
        f"Config: `{res['config_path']}`; {res['data_summary']}",
        f"Run: {res['finished_at']}; pipeline compute {sum(v or 0 for v in res['stage_seconds'].values()) / 60:.1f} min "
        f"(sum of stage times; this invocation's wall {res['total_seconds'] / 60:.1f} min, stages already current in the "
        f"workdir are skipped) on {res['environment']['cpu_count_visible']} CPU cores shared with other jobs "
        f"(torch threads={res['environment']['torch_threads']}).",
        "",
        "| | memorization_rate | reid_rate | MIA AUC | tstr_accuracy | fid_domain | n_samples |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| teacher | {_fmt(t['memorization_rate'])}{_ci(t.get('memorization_ci95'))} | {_fmt(t['reid_rate'])} | "
        f"{_fmt(t.get('mia_auc'))}{_ci(t.get('mia_auc_ci95'))}{_n(t.get('mia_n_patients'))} | "
        f"{_fmt(t['tstr_accuracy'])} | {_fmt(t['fid_domain'], 2)} | {t.get('n_samples')} |",
        f"| student | {_fmt(s['memorization_rate'])}{_ci(s.get('memorization_ci95'))} | {_fmt(s['reid_rate'])} | "
        f"{_fmt(s.get('mia_auc'))}{_ci(s.get('mia_auc_ci95'))}{_n(s.get('mia_n_patients'))} | "
        f"{_fmt(s['tstr_accuracy'])} | {_fmt(s['fid_domain'], 2)} | {s.get('n_samples')} |",
        f"| real (TRTR) | | | | {_fmt(r['real']['trtr_accuracy'])} | | n_train {r['real']['n_train']}, "
        f"n_test {r['real']['n_test']} |",
        "",
        f"Filter: kept **{r['filter']['kept']}**, dropped **{r['filter']['dropped']}** "
        f"(by reason: {json.dumps(r['filter'].get('dropped_by_reason', {}))}; threshold {_fmt(r['filter']['threshold'])}, "
        f"calibration TPR {_fmt(r['filter']['calibration']['tpr'])}, FPR {_fmt(r['filter']['calibration']['fpr'])}).",
    ]
    if fr:
        lines.append(
            f"Independent check (pixel memorization criterion): {fr['teacher_memorized']} of {fr['teacher_samples']} teacher "
            f"samples copy a training image ({fr['teacher_memorized_distinct_patients']} of {fr['train_patients']} patients); "
            f"{fr['memorized_in_kept']} of them were kept by the filter (filter recall on copies: "
            f"{_fmt(fr['filter_recall_on_memorized'])})."
        )
    lines += [
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
        f"| teacher memorizes | memorization_rate > 0 | {_fmt(t['memorization_rate'])} | {g['teacher_memorizes']} |",
        f"| student memorization ≤ 1/10 teacher's | ratio ≤ 0.1, student's 95% upper end too | "
        f"{_fmt(g['memorization_ratio_student_over_teacher'])} (student upper end "
        f"{_fmt(g.get('student_memorization_upper95'))}) | {g['student_memorization_le_tenth']} |",
        f"| student TSTR ≥ 0.9 × teacher's | ratio ≥ 0.9 | {_fmt(g['tstr_ratio_student_over_teacher'])} | "
        f"{g['student_tstr_ge_0.9']} |",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in res["stage_seconds"].items()),
        "",
    ]
    others = res.get("other_runs") or []
    dp_runs = [o for o in others if o.get("epsilon") is not None]
    if dp_runs:
        lines += [
            "DP-SGD teacher vs non-DP teacher vs distilled student (MIA AUC: loss-based membership inference, "
            "120 training images vs 120 held-out real images, 0.5 = no leak):",
            "",
            *render_dp_table([summary_row(res)] + dp_runs),
            "",
        ]
        others = [o for o in others if o.get("epsilon") is None]
    if others:
        lines += [
            "Other runs of this benchmark (same script, other configs; each reproducible the same way with `--config`):",
            "",
            "| config | patients/class | reid target_tpr | teacher mem | student mem | teacher reid | student reid | "
            "teacher TSTR | student TSTR | TRTR | kept/dropped | teacher copies kept by filter |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for o in [summary_row(res)] + others:
            lines.append(
                f"| `{o['config']}` | {o['patients_per_class']} | {o['target_tpr']} | {_fmt(o['teacher_mem'])} | "
                f"{_fmt(o['student_mem'])} | {_fmt(o['teacher_reid'])} | {_fmt(o['student_reid'])} | "
                f"{_fmt(o['teacher_tstr'])} | {_fmt(o['student_tstr'])} | {_fmt(o['trtr'])} | {o['kept']}/{o['dropped']} | "
                f"{o['copies_leaked']} of {o['copies']} |"
            )
        lines.append("")
    if res.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in res["notes"]] + [""]
    lines += [
        "Reproduce:",
        "",
        "```",
        res["command"],
        "```",
        "",
        "memorization_rate: fraction of samples whose noise-debiased, shift-tolerant pixel L2 distance to the nearest",
        "training image is < 1/3 of that to the nearest image of any other patient (`privdistill.metrics.memorization`).",
        "reid_rate: an independently trained re-identification model (other architecture and seed than the filter's).",
        "fid_domain: Fréchet distance in the feature space of a classifier trained on the real training data (not Inception).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="default: configs/privacy_utility.yaml (--quick: _quick)")
    ap.add_argument("--quick", action="store_true", help="small config: a few minutes, proves the script end to end")
    ap.add_argument("--workdir", type=Path, default=None, help="default: /tmp/privdistill-bench/<config name>")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results (full) or the workdir (--quick)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a 2-core machine shared with other jobs, 2 threads "
                         "oversubscribe and were up to 10x slower per step)")
    ap.add_argument("--force", action="store_true", help="re-run every stage even if up to date")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="only re-render the markdown table from an existing results JSON")
    ap.add_argument("--compare", type=Path, nargs="*", default=[], metavar="JSON",
                    help="results JSONs of other runs to summarise in a comparison table")
    ap.add_argument("--note", action="append", default=[], help="a note to print under the table (repeatable)")
    a = ap.parse_args(argv)
    if a.render is not None:
        res = json.loads(a.render.read_text())
        if a.compare:
            res["other_runs"] = [summary_row(json.loads(p.read_text())) for p in a.compare]
        if a.note:
            res["notes"] = a.note
        a.render.write_text(json.dumps(res, indent=2, default=str) + "\n")
        md = render_md(res)
        a.render.with_suffix(".md").write_text(md)
        print(md)
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    from privdistill.config import load_config
    from privdistill.logs import configure_logging
    from privdistill.pipeline import run_pipeline

    configure_logging("console", "info")
    cfg_path = a.config or CONFIGS / ("privacy_utility_quick.yaml" if a.quick else "privacy_utility.yaml")
    cfg = load_config(cfg_path)
    workdir = a.workdir or Path("/tmp/privdistill-bench") / cfg.name
    out_dir = a.out_dir or (workdir if a.quick else RESULTS)

    t0 = time.time()
    records = run_pipeline(cfg, workdir, force=a.force)
    total = time.time() - t0
    report = json.loads((workdir / "report.json").read_text())
    check = filter_recall(workdir, cfg.evaluate.memorization_ratio)

    t, s = report["teacher"], report["student"]
    mem_ratio = None if not t["memorization_rate"] else s["memorization_rate"] / t["memorization_rate"]
    tstr_ratio = None if not t.get("tstr_accuracy") else (s.get("tstr_accuracy") or 0.0) / t["tstr_accuracy"]
    # a goal is met only when the interval supports it: the student's exact 95% upper bound (n samples)
    # must be <= 1/10 of the teacher's rate, and the teacher's lower bound must be above 0
    s_hi = (s.get("memorization_ci95") or [None, None])[1]
    t_lo = (t.get("memorization_ci95") or [None, None])[0]
    goals = {
        "teacher_memorizes": bool(t["memorization_rate"] > 0 and (t_lo is None or t_lo > 0)),
        "memorization_ratio_student_over_teacher": mem_ratio,
        "student_memorization_upper95": s_hi,
        "student_memorization_le_tenth": bool(mem_ratio is not None and mem_ratio <= 0.1 and
                                              (s_hi is None or s_hi <= 0.1 * t["memorization_rate"])),
        "tstr_ratio_student_over_teacher": tstr_ratio,
        "student_tstr_ge_0.9": bool(tstr_ratio is not None and tstr_ratio >= 0.9),
        "targets": GOALS,
    }
    cmd_args = ["--quick"] if a.quick else []
    if a.config:
        cmd_args += ["--config", str(a.config)]
    cmd = ".venv/bin/python benchmarks/privacy_utility.py " + " ".join(
        cmd_args + ["--workdir", str(workdir), "--threads", str(a.threads), "--force"]
    )
    d = cfg.data
    data_summary = (
        f"classes {d.classes}, {d.max_per_class} patients/class, "
        f"{d.visits.count if d.visits else 1} visits/patient, {d.resolution}x{d.resolution}; "
        f"teacher {cfg.teacher.model.block_out_channels} x {cfg.teacher.train.steps} steps (batch {cfg.teacher.train.batch_size}); "
        f"student {cfg.student_config.model.block_out_channels} x {cfg.student_config.train.steps} steps; "
        f"{cfg.sample.per_class} samples/class, {cfg.sample.steps} DDIM steps"
    )
    res = {
        "config_name": cfg.name,
        "config_path": str(Path(cfg_path).resolve().relative_to(HERE.parent)) if Path(cfg_path).resolve().is_relative_to(HERE.parent) else str(cfg_path),
        "config": cfg.model_dump(mode="json"),
        "data_summary": data_summary,
        "command": cmd,
        "workdir": str(workdir),
        "report": {k: report[k] for k in ("teacher", "student", "real", "filter", "independent_reid",
                                          "membership_inference", "teacher_dp") if k in report},
        "filter_check": check,
        "goals": goals,
        "stage_seconds": {k: r.get("seconds") for k, r in records.items()},
        "total_seconds": round(total, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count_visible": os.cpu_count(), "loadavg_at_end": list(os.getloadavg()),
        },
    }
    if a.compare:
        res["other_runs"] = [summary_row(json.loads(p.read_text())) for p in a.compare]
    if a.note:
        res["notes"] = a.note
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "privacy_utility_quick" if a.quick else "privacy_utility"
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = render_md(res)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
