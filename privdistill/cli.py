"""`privdistill` command line: the whole pipeline (`run`) or one stage at a time."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from privdistill import cli_base


def build_parser() -> argparse.ArgumentParser:
    from privdistill.pipeline import STAGES

    p, sub = cli_base.root_parser("privdistill", "Privacy Distillation: teacher -> filter -> student, on one machine.")

    def with_workdir(sp: argparse.ArgumentParser) -> None:
        cli_base.add_config(sp, help="YAML run configuration")
        cli_base.add_workdir(sp, help="directory for all stage outputs")
        cli_base.add_force(sp)

    with_workdir(cli_base.command(sub, "run", _run, "run every stage (skipping those already up to date)"))
    for name in STAGES:
        with_workdir(cli_base.command(sub, name, _run, f"run the {name} stage alone"))
    st = cli_base.command(sub, "status", _status, "which stages are done and up to date")
    cli_base.add_config(st)
    cli_base.add_workdir(st)
    cli_base.add_config(cli_base.command(sub, "validate", _validate, "check a config file and print the resolved config"))
    au = cli_base.command(
        sub, "audit", _audit,
        "fingerprint audit: plant K fingerprints, train a teacher, measure t', check the filter",
        description="Plants K fingerprints into copies of K patients' training images (the run's ingest split), "
                    "trains a teacher on that data, estimates t' per fingerprint, counts fingerprinted free samples "
                    "and checks that the run's filter drops every one. Writes report.json/report.md (LOCAL ONLY: "
                    "they name patients). Exit 4 when a fingerprinted sample survives the filter.")
    cli_base.add_config(au, help="YAML run configuration")
    cli_base.add_workdir(au, help="the run's work directory (ingest, train-reid)")
    au.add_argument("--fingerprints", type=int, default=4, metavar="K", help="fingerprints to plant (default 4)")
    au.add_argument("--out", type=Path, default=None, help="output directory (default WORKDIR/audit)")
    au.add_argument("--steps", type=int, default=None, help="teacher training steps (default: teacher.train.steps)")
    au.add_argument("--samples", type=int, default=200, help="free samples to check (default 200)")
    au.add_argument("--seeds", type=int, default=16, help="noise seeds per t' level (default 16)")
    au.add_argument("--doses", default="1", help="times each fingerprint is planted, cycled over the K "
                    "fingerprints, e.g. 1,2,4 for a dose-response (default 1)")
    au.add_argument("--no-student", action="store_true", help="stop at the teacher: do not train a student on "
                    "the kept set and look for the fingerprints in its samples")
    au.add_argument("--student-steps", type=int, default=None, help="student training steps (default: "
                    "student.train.steps)")
    return p


def _validate(args: argparse.Namespace) -> int:
    from privdistill.config import load_config

    print(json.dumps(load_config(args.config).model_dump(mode="json"), indent=2))
    return 0


def _status(args: argparse.Namespace) -> int:
    from privdistill.config import load_config
    from privdistill.pipeline import stage_status

    for row in stage_status(load_config(args.config), args.workdir):
        state = "up to date" if row["current"] else ("stale" if row["done"] else "not run")
        print(f"{row['stage']:<14} {state}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """`run` (every stage) or one stage, named by the command."""
    from privdistill.config import load_config
    from privdistill.pipeline import STAGES, run_pipeline

    cfg = load_config(args.config)
    stages = list(STAGES) if args.command == "run" else [args.command]
    run_pipeline(cfg, args.workdir, stages=stages, force=args.force)
    if args.command in ("run", "evaluate"):
        print(summary(args.workdir / "report.json"))
        print(f"report: {args.workdir / 'report.json'}  {args.workdir / 'report.html'}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from privdistill.audit.fingerprint_audit import run_fingerprint_audit
    from privdistill.config import load_config
    from privdistill.errors import ConfigError

    bad = [f"--{n}: must be at least 1 (got {v})" for n, v in
           (("fingerprints", args.fingerprints), ("samples", args.samples), ("seeds", args.seeds),
            ("steps", 1 if args.steps is None else args.steps),
            ("student-steps", 1 if args.student_steps is None else args.student_steps)) if v < 1]
    try:
        doses = tuple(int(d) for d in str(args.doses).split(","))
    except ValueError:
        doses = ()
    if not doses or min(doses) < 1:
        bad.append(f"--doses: comma-separated positive integers, e.g. 1,2,4 (got {args.doses!r})")
    if bad:
        raise ConfigError(bad)
    cfg = load_config(args.config)
    out = args.out if args.out is not None else args.workdir / "audit"
    r = run_fingerprint_audit(cfg, args.workdir, fingerprints=args.fingerprints, out_dir=out, steps=args.steps,
                              n_samples=args.samples, seeds=args.seeds, doses=doses, student=not args.no_student,
                              student_steps=args.student_steps)
    t, fs = r["t_prime"], r["free_samples"]
    flt = r["filter"]
    carriers = (f"all {fs['carrying_fingerprint']} dropped by the filter" if fs["carrying_fingerprint"] else
                "none, so this run does not measure the filter's recall on free carriers")
    print(f"t' median {t['median']:.0f} (control {t['control_median']}), max {t['max']} of "
          f"{r['settings']['num_train_timesteps']}; fingerprinted free samples {fs['carrying_fingerprint']}/{fs['n']}: "
          f"{carriers}; planted exact copies dropped {flt['exact_copies_of_fingerprinted_images_dropped']}")
    st = r.get("student")
    if st:
        c, b = st["carrying"], st["unmarked_baseline"]
        print(f"student (trained on the {st['n_kept']} kept samples): {c['k']}/{c['n']} samples carry a fingerprint "
              f"(95% CI {c['ci95'][0]:.4f}-{c['ci95'][1]:.4f}; unmarked baseline {b['k']}/{b['n']}); "
              f"student t' median {st['t_prime_median']}")
    print(f"report: {out / 'report.json'}  {out / 'report.md'}")
    return 0


def summary(report_path: Path) -> str:
    """A few lines for the terminal: teacher vs student privacy and utility, and what the filter did."""
    if not report_path.is_file():
        return "no report yet (the evaluate stage has not run)"
    r = json.loads(report_path.read_text())

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"

    keys = ("memorization_rate", "reid_rate", "tstr_accuracy", "fid_domain")
    lines = [f"{'':<9}" + "".join(f"{k:>19}" for k in keys)]
    for who in ("teacher", "student"):
        lines.append(f"{who:<9}" + "".join(f"{fmt(r[who].get(k)):>19}" for k in keys))
    f = r["filter"]
    cal, audit = f.get("calibration") or {}, f.get("audit") or {}
    ci = audit.get("fresh_drop_ci") or [None, None]
    lines.append(f"real TRTR accuracy {fmt(r['real']['trtr_accuracy'])}; filter kept {f['kept']}, dropped {f['dropped']} "
                 f"(alpha {fmt(cal.get('alpha'))} on {cal.get('n_null')} held-out images; fresh-drop rate "
                 f"{fmt(audit.get('fresh_drop_rate'))} [{fmt(ci[0])}, {fmt(ci[1])}], n {audit.get('fresh_n')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli_base.main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
