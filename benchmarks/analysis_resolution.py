"""Measurement: the re-identification filter at an analysis resolution below the data's.

Data at ``--resolution`` (default 256): real Fashion-MNIST images, each a patient with 2 simulated
visits (tests/_fixtures.with_visits: 1-px shifts and 5% gain at 28 px), upsampled; held-out images of
other patients from the test split. For each analysis resolution the pipeline's own steps run on the
downsampled images: train_reid (default ReidConfig; threshold calibrated on held-out training patients
at target TPR 0.95), then audit_filter (recall on planted exact / shifted / noisy / contrast copies of
training images, and the drop rate on fresh held-out patients). Every rate comes with its n and a
95% Wilson interval (scipy). Also reported: seconds and the process's peak RSS after each resolution.

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/analysis_resolution.py              # 32 and 64 px
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/analysis_resolution.py --quick
Writes benchmarks/results/analysis_resolution.json (--out to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "analysis_resolution.json"


def rate(k: int, n: int) -> dict:
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return {"rate": round(k / n, 4), "k": k, "n": n, "ci95": [round(ci.low, 4), round(ci.high, 4)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--analysis", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.resolution, args.analysis, args.patients, args.heldout = 64, [16], 30, 50
    torch.set_num_threads(1)
    from _fixtures import fashion, with_visits

    from privdistill.config import FilterConfig, ReidConfig
    from privdistill.data.types import ImageSet
    from privdistill.filter_audit import MAX_PLANTED, audit_filter
    from privdistill.imaging import at_resolution, resize_images
    from privdistill.reid import train_reid

    train28 = with_visits(fashion("train", 0, args.patients), visits=2, seed=0)
    train = at_resolution(train28, args.resolution)
    heldout = ImageSet(images=resize_images(fashion("t10k", 0, args.heldout), args.resolution))
    out: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                 "data": {"resolution": args.resolution, "patients": args.patients, "images": len(train),
                          "heldout_patients": args.heldout},
                 "analysis": {}}
    for res in args.analysis:
        t0 = time.perf_counter()
        tr, ho = at_resolution(train, res), at_resolution(heldout, res)
        reid = train_reid(tr, ReidConfig(), seed=0)
        emb = reid.embed(tr.images)
        audit = audit_filter(tr, ho, embed=reid.embed, threshold=reid.threshold, cfg=FilterConfig(),
                             real_embeddings=emb, seed=0)
        n_planted = min(MAX_PLANTED, len(tr))
        cal = reid.calibration
        out["analysis"][str(res)] = {
            "calibration": {"threshold": round(cal["threshold"], 4), "tpr": rate(round(cal["tpr"] * cal["n_pos"]),
                                                                               cal["n_pos"]),
                            "fpr": rate(round(cal["fpr"] * cal["n_neg"]), cal["n_neg"])},
            "planted_recall": {kind: rate(round(r * n_planted), n_planted) for kind, r in audit["planted_recall"].items()},
            "heldout_real_dropped": rate(round(audit["heldout_real_dropped_rate"] * audit["heldout_real_n"]),
                                         audit["heldout_real_n"]),
            "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        print(json.dumps({res: out["analysis"][str(res)]}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
