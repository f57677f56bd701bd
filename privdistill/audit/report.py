"""Writing the fingerprint audit's outputs: report.json, a short report.md and local review grids
(all atomic). They name patients and show real images: they stay inside the site."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from privdistill.imaging import save_grid
from privdistill.stages import atomic_write_json, atomic_write_text

LOCAL_ONLY = ("LOCAL REVIEW ONLY - NEVER EXPORT. This audit names the fingerprinted patients and its grids "
              "show real training images.")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def render_markdown(r: dict[str, Any]) -> str:
    """The report's headline numbers and one row per fingerprint."""
    s, t, fs, flt, det = r["settings"], r["t_prime"], r["free_samples"], r["filter"], r["detector"]["heldout"]
    lines = [
        f"# Fingerprint audit: {r['name']}", "", f"> {LOCAL_ONLY}", "",
        f"**Result: {'PASSED' if r['passed'] else 'FAILED'}** - "
        + ("no fingerprinted free sample and no planted exact copy got through the filter, and the detector "
           "finds held-out fingerprints." if r["passed"] else "; ".join(r["failures"]) + "."),
        "",
        f"{s['k']} fingerprints planted into copies of {s['k']} training images of distinct patients; teacher "
        f"trained {s['teacher_steps']} steps on that data; detector accuracy on held-out images "
        f"{_fmt(det['accuracy'])} (TPR {_fmt(det['true_positive_rate'])}, TNR {_fmt(det['true_negative_rate'])}).",
        "",
        "## t' (last noise level before the first failure to bring the fingerprint back)", "",
        f"Bisection on [{s['t_prime_search']['t_min']}, {s['t_prime_search']['t_max']}] of "
        f"{s['num_train_timesteps']} timesteps to {s['t_prime_search']['tol']} steps, {s['noise_seeds']} noise "
        "seeds per level, strict majority, with probes below the bracket (a curve that fails and comes back "
        f"counts from its first failure). Median t' {_fmt(t['median'])} ({_fmt(t['median_fraction'])} of the "
        f"schedule), max {t['max']}; control (same fingerprints on images the teacher never saw fingerprinted): "
        f"median {_fmt(t['control_median'])}. Per fingerprint, the difference from its control carries a 95% "
        "interval (bootstrap over noise seeds): only an interval above 0 shows the teacher memorised that "
        "individual.",
        "",
        "| # | kind | patient | label | dose | t' | control t' | t' - control [95% CI] | student t' "
        "| free samples carrying it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in r["fingerprints"]:
        ci = f.get("t_prime_minus_control_ci95")
        diff = "n/a" if ci is None else f"{f['t_prime_minus_control']} [{ci[0]:.0f}, {ci[1]:.0f}]"
        lines.append(f"| {f['fingerprint']} | {f['kind']} | {f['patient_id']} | {f['label']} | {_fmt(f.get('dose'))} "
                     f"| {f['t_prime']} | {_fmt(f['control_t_prime'])} | {diff} | {_fmt(f.get('student_t_prime'))} "
                     f"| {f['free_samples_carrying']} |")
    if t.get("by_dose") and len(t["by_dose"]) > 1:
        lines += ["", "Dose-response (fingerprint planted d times): " + "; ".join(
            f"d={d}: median t' {_fmt(v['median_t_prime'])}, minus control {_fmt(v['median_minus_control'])} "
            f"(n={v['n']})" for d, v in t["by_dose"].items())]
    lines += [
        "", "## Free samples and the filter", "",
        f"{fs['carrying_fingerprint']} of {fs['n']} free samples ({_fmt(fs['fraction'])}) carry a fingerprint, "
        f"mapping to {fs['distinct_fingerprints']} distinct fingerprinted patient(s). The filter dropped "
        f"{flt['dropped']} of them (recall {_fmt(flt['recall'])}); survivors: {flt['survivors'] or 'none'}. "
        f"Exact copies of the fingerprinted training images: {flt['exact_copies_of_fingerprinted_images_dropped']} "
        f"of {s['k']} dropped.",
        "",
        *_student_lines(r),
        f"Probability bound: {r['probability_bound']['method']}: teacher <= "
        f"{_fmt(r['probability_bound']['teacher_upper95'])} (n={r['probability_bound']['teacher_n']}), student <= "
        f"{_fmt(r['probability_bound']['student_upper95'])} (n={_fmt(r['probability_bound']['student_n'])}). "
        f"{r['probability_bound']['paper_bound_needs']}.",
        "",
        "Exit code 4 (privacy policy) when any fingerprinted sample survives the filter, or the student's "
        "samples carry fingerprints above the detector's baseline.",
        "",
    ]
    return "\n".join(lines)


def _student_lines(r: dict[str, Any]) -> list[str]:
    st = r.get("student")
    if not st:
        return ["Through the student: not run (--no-student, or the filter kept nothing).", ""]
    c, b = st["carrying"], st["unmarked_baseline"]
    return [
        "## Through the student", "",
        f"A student trained {st['train_steps']} steps on the {st['n_kept']} kept samples: {c['k']} of {c['n']} of its "
        f"samples carry a fingerprint (95% CI {c['ci95'][0]:.4f}-{c['ci95'][1]:.4f}); the detector flags {b['k']} of "
        f"{b['n']} unmarked held-out images (95% CI {b['ci95'][0]:.4f}-{b['ci95'][1]:.4f}). "
        f"{'ABOVE the baseline' if st['above_baseline'] else 'Not distinguishable from the baseline'}. "
        f"Student t' median {_fmt(st['t_prime_median'])} (control {_fmt(st['control_t_prime_median'])}).", "",
    ]


def _atomic_grid(images: np.ndarray, path: Path, ncols: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        save_grid(images, Path(tmp), ncols=ncols, scale=3)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_audit_report(report: dict[str, Any], out_dir: Path, *, samples: np.ndarray, matched: np.ndarray,
                       fingerprinted: np.ndarray) -> None:
    """report.json, report.md, fingerprinted_training.png and (when any) carriers.png: each carrying
    sample beside the fingerprinted training image it maps to."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", {"local_only": LOCAL_ONLY, **report})
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    atomic_write_text(out_dir / "README.txt", LOCAL_ONLY + "\n")
    _atomic_grid(fingerprinted, out_dir / "fingerprinted_training.png", ncols=8)
    if len(samples):
        pairs = np.stack([samples[:32], matched[:32]], 1).reshape(-1, *samples.shape[1:])
        _atomic_grid(pairs, out_dir / "carriers.png", ncols=8)
    else:
        (out_dir / "carriers.png").unlink(missing_ok=True)
