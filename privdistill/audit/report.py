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
        "## t' (largest noise level from which denoising brings the fingerprint back)", "",
        f"Grid {s['grid']} of {s['num_train_timesteps']} timesteps, {s['noise_seeds']} noise seeds, majority vote. "
        f"Median t' {_fmt(t['median'])} ({_fmt(t['median_fraction'])} of the schedule), max {t['max']}; "
        f"control (same fingerprints on images the teacher never saw fingerprinted): median "
        f"{_fmt(t['control_median'])}. A t' well above the control means the teacher memorised that individual.",
        "",
        "| # | kind | patient | label | t' | control t' | free samples carrying it |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in r["fingerprints"]:
        lines.append(f"| {f['fingerprint']} | {f['kind']} | {f['patient_id']} | {f['label']} | {f['t_prime']} | "
                     f"{_fmt(f['control_t_prime'])} | {f['free_samples_carrying']} |")
    lines += [
        "", "## Free samples and the filter", "",
        f"{fs['carrying_fingerprint']} of {fs['n']} free samples ({_fmt(fs['fraction'])}) carry a fingerprint, "
        f"mapping to {fs['distinct_fingerprints']} distinct fingerprinted patient(s). The filter dropped "
        f"{flt['dropped']} of them (recall {_fmt(flt['recall'])}); survivors: {flt['survivors'] or 'none'}. "
        f"Exact copies of the fingerprinted training images: {flt['exact_copies_of_fingerprinted_images_dropped']} "
        f"of {s['k']} dropped.",
        "",
        "Exit code 4 (privacy policy) when any fingerprinted sample survives the filter.",
        "",
    ]
    return "\n".join(lines)


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
