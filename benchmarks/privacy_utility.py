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
    """Memorized teacher samples (the independent pixel criterion) and how many of them the filter dropped,
    with a patient-level bootstrap 95% interval (patient = the training image each copy is nearest to)."""
    import numpy as np

    from privdistill.data.types import ImageSet
    from privdistill.filter_audit import patient_bootstrap
    from privdistill.metrics import memorization

    train = ImageSet.load(workdir / "ingest" / "train.npz")
    samples = ImageSet.load(workdir / "sample" / "samples.npz")
    kept = ImageSet.load(workdir / "filter" / "kept.npz")
    dropped = np.load(workdir / "filter" / "review" / "decisions.npz")["dropped"]
    m_all = memorization(samples.images, train, ratio=ratio)
    m_kept = memorization(kept.images, train, ratio=ratio) if len(kept) else {"count": 0, "rate": 0.0}
    memorized = np.flatnonzero(m_all["memorized"])
    n_mem, n_leak = int(len(memorized)), int(m_kept["count"])
    owners = train.patient_ids[m_all["nearest_index"][memorized]] if n_mem else np.zeros(0, str)
    hits = np.isin(memorized, dropped)
    return {
        "teacher_samples": len(samples),
        "teacher_memorized": n_mem,
        "teacher_memorized_distinct_patients": int(len(np.unique(owners))),
        "train_patients": int(len(np.unique(train.patient_ids))) if train.patient_ids is not None else None,
        "kept": len(kept),
        "memorized_in_kept": n_leak,
        "memorization_rate_in_kept": float(m_kept["rate"]),
        "filter_recall_on_memorized": None if n_mem == 0 else round(float(hits.mean()), 4),
        "filter_recall_on_memorized_ci": patient_bootstrap(hits, owners, seed=0) if n_mem else None,
    }


def clopper_pearson(k: int, n: int) -> list[float] | None:
    from privdistill.filter_audit import binomial_ci

    return binomial_ci(k, n)


def hanley_mcneil(auc: float | None, n1: int | None, n2: int | None) -> list[float] | None:
    """95% interval of a ROC AUC (Hanley & McNeil 1982 standard error, normal approximation)."""
    import math

    if auc is None or not n1 or not n2:
        return None
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    se = math.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n2 - 1) * (q2 - auc * auc)) / (n1 * n2))
    return [max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)]


def rate_ci(side: dict, key_ci: str = "memorization_ci") -> list[float] | None:
    """The report's own interval (evaluate) if it has one, else Clopper-Pearson from the rate and n_samples."""
    if isinstance(side.get(key_ci), list):
        return side[key_ci]
    rate, n = side.get("memorization_rate"), side.get("n_samples")
    return None if rate is None or not n else clopper_pearson(round(rate * n), n)


def headline_goals(report: dict, check: dict, *, no_memorization: bool) -> list[dict]:
    """Each headline goal with its measured value, 95% interval and n, met or not (None: not measured)."""
    t, s, f = report["teacher"], report["student"], report["filter"]
    cal, audit = f.get("calibration") or {}, f.get("audit") or {}
    alpha = cal.get("alpha")
    goals = []

    def goal(name: str, target: str, value, ci, n, met) -> None:
        goals.append({"goal": name, "target": target, "value": value, "ci": ci, "n": n, "met": met})

    t_ci, s_ci = rate_ci(t), rate_ci(s)
    if not no_memorization:
        goal("teacher memorizes", "memorization 95% lower bound > 0", t["memorization_rate"], t_ci,
             t.get("n_samples"), None if t_ci is None else t_ci[0] > 0)
        goal("filter recall on the teacher's copies (independent metric)", "report", check.get("filter_recall_on_memorized"),
             check.get("filter_recall_on_memorized_ci"), check.get("teacher_memorized"), None)
    fd, fd_ci = audit.get("fresh_drop_rate"), audit.get("fresh_drop_ci")
    goal("fresh-drop rate (held-out new patients)", f"<= alpha {alpha} (point estimate)", fd, fd_ci,
         audit.get("fresh_n"), None if fd is None else fd <= alpha)
    goal("fresh-drop rate consistent with alpha", f"95% lower bound <= {alpha} (upper bound <= alpha would need a "
         "larger held-out set)", fd, fd_ci, audit.get("fresh_n"), None if not fd_ci else fd_ci[0] <= alpha)
    if not no_memorization:
        up = None if s_ci is None else s_ci[1]
        t_rate = t["memorization_rate"] or 0.0
        goal("student memorization upper bound <= 1/10 of the teacher's rate",
             f"upper bound <= {0.1 * t_rate:.4f}", s["memorization_rate"], s_ci, s.get("n_samples"),
             None if up is None else up <= 0.1 * t_rate)
    tt, st = t.get("tstr_accuracy"), s.get("tstr_accuracy")
    ratio = None if not tt or st is None else st / tt
    goal("student TSTR >= 0.9 x teacher's", ">= 0.9 (ratio of point estimates)", ratio, None,
         report["real"].get("n_test"), None if ratio is None else ratio >= 0.9)
    kd = f.get("kept_data_copying_auc")
    kd_v = kd.get("auc") if isinstance(kd, dict) else kd
    kd_ci = kd.get("ci") if isinstance(kd, dict) else f.get("kept_data_copying_ci")
    goal("kept-sample data-copying AUC", "<= 0.55", kd_v, kd_ci, f.get("kept"), None if kd_v is None else kd_v <= 0.55)
    mia = (report.get("membership_inference") or {}).get("student") or {}
    if mia.get("auc_ci95") is not None:  # the report's patient-level bootstrap interval; n = member patients
        goal("student MIA AUC (loss attack)", "report (0.5 = no leak)", mia.get("auc"), mia["auc_ci95"],
             mia.get("n_member_units"), None)
    else:  # reports from before the patient-level bootstrap
        goal("student MIA AUC (loss attack)", "report (0.5 = no leak)", mia.get("auc"),
             hanley_mcneil(mia.get("auc"), mia.get("n_members"), mia.get("n_nonmembers")), mia.get("n_members"), None)
    if no_memorization:
        n_syn = (f.get("kept") or 0) + (f.get("dropped") or 0)
        frac = None if not n_syn else f["kept"] / n_syn
        need = None if alpha is None else 1 - alpha - 0.05
        goal("filter keeps enough when the teacher does not memorize", f">= 1 - alpha - 0.05 = {need:.2f}", frac,
             clopper_pearson(f.get("kept") or 0, n_syn), n_syn, None if frac is None or need is None else frac >= need)
        goal("teacher memorization (expected ~0 here)", "report", t["memorization_rate"], t_ci, t.get("n_samples"), None)
    return goals


def partial_report(workdir: Path, check: dict) -> dict:
    """What a run stopped after the filter stage measured, shaped like report.json (the rest None)."""
    fr = json.loads((workdir / "filter" / "privacy_report.json").read_text())
    n = check["teacher_samples"]
    rate = check["teacher_memorized"] / n if n else None
    none = {"memorization_rate": None, "reid_rate": None, "tstr_accuracy": None, "fid_domain": None, "n_samples": None}
    return {
        "teacher": {**none, "memorization_rate": rate, "n_samples": n},
        "student": dict(none),
        "real": {"trtr_accuracy": None, "n_train": None, "n_test": None},
        "filter": {k: fr.get(k) for k in ("kept", "dropped", "threshold", "calibration", "reid_pairs",
                                          "dropped_by_reason", "audit")},
        "partial": "pipeline stopped after the filter stage: student and evaluation numbers not measured",
    }


def render_goals(goals: list[dict]) -> list[str]:
    lines = ["| goal | target | measured [95% CI] | n | met |", "|---|---|---|---:|---|"]
    for g in goals:
        met = "n/a (not measured)" if g["value"] is None else ("—" if g["met"] is None else ("yes" if g["met"] else "**NO**"))
        lines.append(f"| {g['goal']} | {g['target']} | {_fmt(g['value'])}{_ci(g['ci'])} | {_fmt(g['n'])} | {met} |")
    return lines


def render_recall(audit: dict) -> list[str]:
    rec = audit.get("recall") or {}
    if not rec:
        return []
    few = set(audit.get("too_few") or [])
    lines = ["| kind of copy | recall [95% CI, patient bootstrap] | n (patients) | |", "|---|---|---:|---|"]
    for k, r in rec.items():
        lines.append(f"| {k} | {_fmt(r.get('value'))}{_ci(r.get('ci'))} | {r.get('n')} ({r.get('n_patients')}) | "
                     f"{'too few cases' if k in few else ''} |")
    return lines


def summary_row(res: dict) -> dict:
    """One line of the comparison table from a results JSON."""
    r, fc = res["report"], res.get("filter_check") or {}
    return {
        "config": res["config_path"], "name": res["config_name"],
        "alpha": res["config"].get("filter", {}).get("max_fresh_drop"),
        "patients_per_class": res["config"]["data"]["max_per_class"],
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
    cal, aud = r["filter"].get("calibration") or {}, r["filter"].get("audit") or {}
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
        f"| teacher | {_fmt(t['memorization_rate'])}{_ci(t.get('memorization_ci'))} | {_fmt(t['reid_rate'])} | "
        f"{_fmt(t.get('mia_auc'))}{_ci(t.get('mia_auc_ci95'))}{_n(t.get('mia_n_patients'))} | "
        f"{_fmt(t['tstr_accuracy'])} | {_fmt(t['fid_domain'], 2)} | {t.get('n_samples')} |",
        f"| student | {_fmt(s['memorization_rate'])}{_ci(s.get('memorization_ci'))} | {_fmt(s['reid_rate'])} | "
        f"{_fmt(s.get('mia_auc'))}{_ci(s.get('mia_auc_ci95'))}{_n(s.get('mia_n_patients'))} | "
        f"{_fmt(s['tstr_accuracy'])} | {_fmt(s['fid_domain'], 2)} | {s.get('n_samples')} |",
        f"| real (TRTR) | | | | {_fmt(r['real']['trtr_accuracy'])} | | n_train {r['real']['n_train']}, "
        f"n_test {r['real']['n_test']} |",
        "",
        f"Filter: kept **{r['filter']['kept']}**, dropped **{r['filter']['dropped']}** "
        f"(by reason: {json.dumps(r['filter'].get('dropped_by_reason', {}))}); calibrated on the decision it makes: "
        f"alpha {cal.get('alpha')} split over {cal.get('detectors')} ({_fmt(cal.get('alpha_per_detector'), 4)} each), "
        f"n_null {cal.get('n_null')} held-out images of new patients, thresholds "
        f"{json.dumps({k: round(v, 4) for k, v in (cal.get('thresholds') or {}).items()})}. "
        f"Fresh-drop rate on a separate held-out set: {_fmt(aud.get('fresh_drop_rate'))}{_ci(aud.get('fresh_drop_ci'))} "
        f"(n {aud.get('fresh_n')}).",
    ]
    if fr:
        lines.append(
            f"Independent check (pixel memorization criterion): {fr['teacher_memorized']} of {fr['teacher_samples']} teacher "
            f"samples copy a training image ({fr['teacher_memorized_distinct_patients']} of {fr['train_patients']} patients); "
            f"{fr['memorized_in_kept']} of them were kept by the filter (filter recall on copies: "
            f"{_fmt(fr['filter_recall_on_memorized'])})."
        )
    lines += ["", "Goals of the headline, every number with its 95% interval and n:", "", *render_goals(g["table"]), ""]
    if aud.get("recall"):
        lines += ["Filter recall per kind of copy (the filter was not built around these; "
                  f"kinds with < {aud.get('min_cases', {}).get('n')} cases or < {aud.get('min_cases', {}).get('n_patients')} "
                  "patients are marked too few):", "", *render_recall(aud), ""]
    lira = res.get("lira")
    if lira:
        from mia_lira import NOTE, render_table

        lines += [f"Stronger attack: LiRA with {lira['n_shadows']} shadow models (shadow teachers on paired random "
                  "halves of the member + non-member patient pool; for the student, whole shadow distillations) beside "
                  f"the loss attack on the same patients ({lira['seconds'] / 60:.1f} min):", "",
                  *render_table(lira["results"]), "", NOTE, ""]
    lines += [
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
            "| config | patients/class | filter alpha | teacher mem | student mem | teacher reid | student reid | "
            "teacher TSTR | student TSTR | TRTR | kept/dropped | teacher copies kept by filter |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for o in [summary_row(res)] + others:
            lines.append(
                f"| `{o['config']}` | {o['patients_per_class']} | {o.get('alpha')} | {_fmt(o['teacher_mem'])} | "
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
    ap.add_argument("--no-memorization", action="store_true",
                    help="the config's teacher is not expected to memorize: the goal is that the filter keeps "
                         ">= 1 - alpha - 0.05 of the samples (privacy_utility_nomem.yaml)")
    ap.add_argument("--until", default=None, metavar="STAGE",
                    help="run the pipeline only up to STAGE (e.g. filter) and report what that measured (the "
                         "filter's goals) when the whole run does not fit in the time at hand")
    ap.add_argument("--stem", default=None, help="results file name (default privacy_utility[_quick])")
    ap.add_argument("--lira-shadows", type=int, default=None, metavar="N",
                    help="the stronger attack beside the loss attack: LiRA on the teacher and the student with N "
                         "shadow models each (even; each shadow is one more teacher + sampling + student of the "
                         "config). Default 2 for a full run, 0 (skip) with --quick or --until")
    a = ap.parse_args(argv)
    default_lira_shadows = 0 if a.quick or a.until else 2
    if a.lira_shadows is None:
        a.lira_shadows = default_lira_shadows
    if a.lira_shadows and a.until:
        ap.error("--lira-shadows needs the whole pipeline (it attacks the student): leave out --until or pass 0")
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

    from privdistill.pipeline import STAGES

    t0 = time.time()
    stages = None if a.until is None else list(STAGES[: STAGES.index(a.until) + 1])
    records = run_pipeline(cfg, workdir, force=a.force, stages=stages)
    total = time.time() - t0
    check = filter_recall(workdir, cfg.evaluate.memorization_ratio)
    report = json.loads((workdir / "report.json").read_text()) if stages is None else partial_report(workdir, check)

    t, s = report["teacher"], report["student"]
    mem_ratio = None if not t["memorization_rate"] or s["memorization_rate"] is None \
        else s["memorization_rate"] / t["memorization_rate"]
    tstr_ratio = None if not t.get("tstr_accuracy") or s.get("tstr_accuracy") is None \
        else s["tstr_accuracy"] / t["tstr_accuracy"]
    goals = {
        "teacher_memorizes": bool((t["memorization_rate"] or 0) > 0),
        "memorization_ratio_student_over_teacher": mem_ratio,
        "tstr_ratio_student_over_teacher": tstr_ratio,
        "table": headline_goals(report, check, no_memorization=a.no_memorization),
        "targets": GOALS,
    }
    cmd_args = ["--quick"] if a.quick else []
    if a.config:
        cmd_args += ["--config", str(a.config)]
    if a.no_memorization:
        cmd_args += ["--no-memorization"]
    if a.stem:
        cmd_args += ["--stem", a.stem]
    if a.lira_shadows != default_lira_shadows:
        cmd_args += ["--lira-shadows", str(a.lira_shadows)]
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
        "no_memorization_config": a.no_memorization,
        "report": {k: report[k] for k in ("teacher", "student", "real", "filter", "independent_reid", "partial",
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
    if a.lira_shadows:
        from mia_lira import run_lira

        t_lira = time.time()
        lira = run_lira(cfg, workdir, n_shadows=a.lira_shadows, student=True)
        res["lira"] = {"n_shadows": a.lira_shadows, "seconds": round(time.time() - t_lira, 1), "results": lira}
        for who in ("teacher", "student"):
            on = lira[who]["online"]
            goals["table"].append({"goal": f"{who} membership, LiRA online ({a.lira_shadows} shadows)",
                                   "target": "report (0.5 = no leak)", "value": on["auc"], "ci": on["auc_ci95"],
                                   "n": on["n_member_units"], "met": None})
    if a.compare:
        res["other_runs"] = [summary_row(json.loads(p.read_text())) for p in a.compare]
    if a.note:
        res["notes"] = a.note
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.stem or ("privacy_utility_quick" if a.quick else "privacy_utility")
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = render_md(res)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
