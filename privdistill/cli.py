"""`privdistill` command line: the whole pipeline (`run`) or one stage at a time."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from privdistill import __version__
from privdistill.errors import PrivdistillError

EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (a bug: please report it with the log)",
    2: "configuration invalid (every problem is listed; nothing was written)",
    3: "input data unusable (missing files, no readable image)",
    4: "privacy policy refused the action",
    5: "hash or signature verification failed",
    6: "network/service unavailable; retrying later may succeed",
    7: "a stage could not run (missing upstream stage or inconsistent inputs)",
    130: "interrupted (Ctrl-C); rerun to resume",
}


def _parser() -> argparse.ArgumentParser:
    from privdistill.pipeline import STAGES

    epilog = "exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())
    p = argparse.ArgumentParser(
        prog="privdistill", description="Privacy Distillation: teacher -> filter -> student, on one machine.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"privdistill {__version__}")
    p.add_argument("--log-format", choices=["console", "json"], default="console")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    def with_workdir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", type=Path, help="YAML run configuration")
        sp.add_argument("--workdir", type=Path, required=True, help="directory for all stage outputs")
        sp.add_argument("--force", action="store_true", help="re-run even if inputs are unchanged")

    with_workdir(sub.add_parser("run", help="run every stage (skipping those already up to date)"))
    for name in STAGES:
        with_workdir(sub.add_parser(name, help=f"run the {name} stage alone"))
    st = sub.add_parser("status", help="which stages are done and up to date")
    st.add_argument("config", type=Path)
    st.add_argument("--workdir", type=Path, required=True)
    va = sub.add_parser("validate", help="check a config file and print the resolved config")
    va.add_argument("config", type=Path)
    au = sub.add_parser(
        "audit", help="fingerprint audit: plant K fingerprints, train a teacher, measure t', check the filter",
        description="Plants K fingerprints into copies of K patients' training images (the run's ingest split), "
                    "trains a teacher on that data, estimates t' per fingerprint, counts fingerprinted free samples "
                    "and checks that the run's filter drops every one. Writes report.json/report.md (LOCAL ONLY: "
                    "they name patients). Exit 4 when a fingerprinted sample survives the filter.")
    au.add_argument("config", type=Path, help="YAML run configuration")
    au.add_argument("--workdir", type=Path, required=True, help="the run's work directory (ingest, train-reid)")
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


def _dispatch(args: argparse.Namespace) -> int:
    from privdistill.config import load_config
    from privdistill.pipeline import STAGES, run_pipeline, stage_status

    cfg = load_config(args.config)
    if args.command == "validate":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "status":
        for row in stage_status(cfg, args.workdir):
            state = "up to date" if row["current"] else ("stale" if row["done"] else "not run")
            print(f"{row['stage']:<14} {state}")
        return 0
    if args.command == "audit":
        return _audit(cfg, args)
    stages = list(STAGES) if args.command == "run" else [args.command]
    run_pipeline(cfg, args.workdir, stages=stages, force=args.force)
    if args.command in ("run", "evaluate"):
        print(summary(args.workdir / "report.json"))
        print(f"report: {args.workdir / 'report.json'}  {args.workdir / 'report.html'}")
    return 0


def _audit(cfg: Any, args: argparse.Namespace) -> int:
    from privdistill.audit.fingerprint_audit import run_fingerprint_audit
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
    from privdistill.logs import configure_logging

    args = _parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    return run_guarded(lambda: _dispatch(args), structlog.get_logger("privdistill.cli"))


def run_guarded(body: Callable[[], int], log: Any, **context: Any) -> int:
    """Run one CLI command: a PrivdistillError becomes its one-line message and exit code, Ctrl-C 130.
    Shared by the privdistill, privdistill-site and privdistill-coordinator commands."""
    try:
        return int(body())
    except PrivdistillError as err:
        log.error("failed", error_type=type(err).__name__, exit_code=err.exit_code, **context)
        print(f"error: {err}", file=sys.stderr)  # the message says what is wrong and who must act
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
