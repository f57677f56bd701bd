"""`privdistill-coordinator train-student | evaluate | release`: the student side of the coordinator CLI.
Each command reads the accepted shards from the ledger and returns an exit code (err.exit_code on failure)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from privdistill.errors import PrivdistillError

log = structlog.get_logger(__name__)


def _accepted(config_path: Path) -> tuple[Path, list[Any]]:
    """(state_dir, ShardRefs of every accepted shard, with the hashes the ledger accepted)."""
    from coordinator.config import load_coordinator_config
    from coordinator.ledger import Ledger
    from coordinator.student import ShardRef

    ccfg = load_coordinator_config(config_path)
    shards = Ledger(ccfg.ledger_path).accepted_shards()
    refs = [ShardRef(Path(s.dir), s.tar_sha256, getattr(s, "manifest_sha256", None) or None) for s in shards]
    return ccfg.state_dir, refs


def _train(args: argparse.Namespace) -> int:
    from coordinator.student import TRAIN_STAGE, load_training_config, train_student
    from privdistill.stages import read_record

    cfg = load_training_config(args.training)
    _, shards = _accepted(args.config)
    before = read_record(args.workdir, TRAIN_STAGE)
    rec = train_student(shards, cfg, args.workdir, force=args.force)
    rep = rec["report"]
    if before is not None and before.get("finished_at") == rec["finished_at"] and before["fingerprint"] == rec["fingerprint"]:
        print(f"train-student: up to date (no new accepted shard, config unchanged): {len(shards)} shard(s)")
    else:
        print(f"train-student: trained on {rep['n_shards']} shard(s), {rep['n_samples']} samples, {rep['steps']} steps, "
              f"final loss {rep['final_loss']:.4f}, {rep['seconds']:.0f} s on {rep['device']}")
    print(f"model: {args.workdir / TRAIN_STAGE / 'model'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from coordinator.release import check_policy
    from coordinator.student import (
        EVAL_STAGE,
        REPORT_FILE,
        TRAIN_STAGE,
        TRAINING_FILE,
        evaluate_student,
        load_training_config,
    )

    cfg = load_training_config(args.training)
    _, shards = _accepted(args.config)
    rep = evaluate_student(shards, cfg, args.workdir, force=args.force)["report"]
    u = rep

    def f(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "n/a"

    print(f"student: TSTR accuracy {f(u['tstr_accuracy'])} (training shards: {f(u['shards_tstr_accuracy'])}, "
          f"reference TRTR: {f(rep['reference'].get('trtr_accuracy'))}), fid_domain {f(u['fid_domain'])}, "
          f"copies of training-shard images {f(u['copy_rate_vs_training_shards'])}")
    print("privacy vs patients: not measured here (no patient data at the coordinator); see report.json 'privacy'")
    training = json.loads((args.workdir / TRAIN_STAGE / TRAINING_FILE).read_text())
    failures = check_policy(training, cfg.release)
    print("release policy: " + ("passes" if not failures else "FAILS:\n  - " + "\n  - ".join(failures)))
    print(f"report: {args.workdir / EVAL_STAGE / REPORT_FILE}")
    return 0


def _site_keys(config_path: Path) -> dict[str, str]:
    """Public keys of the allow-listed, non-revoked sites (they sign student attestations)."""
    from coordinator.config import load_coordinator_config
    from coordinator.ledger import Ledger

    return {s.name: s.public_key for s in Ledger(load_coordinator_config(config_path).ledger_path).sites()
            if not s.revoked}


def _release(args: argparse.Namespace) -> int:
    from coordinator.release import RELEASE_FILE, release
    from coordinator.student import load_training_config

    cfg = load_training_config(args.training)
    state_dir, shards = _accepted(args.config)
    path = release(args.workdir, args.out, cfg, shards=shards, site_evidence=args.site_evidence,
                   site_keys=_site_keys(args.config))
    rec = json.loads((path / RELEASE_FILE).read_text())
    try:
        from coordinator.audit import AuditLog
    except ImportError:  # pragma: no cover - audit module ships with the coordinator
        AuditLog = None
    if AuditLog is not None:
        AuditLog(state_dir).event("released", name=rec["name"], version=rec["version"], path=str(path),
                                  shards=[s["tar_sha256"] for s in rec["training_data"]["shards"]],
                                  sites=rec["training_data"]["sites"])
    print(f"released {rec['name']} v{rec['version']}:")
    print(path)  # last line: the release directory (scripts read it)
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except PrivdistillError as err:
            log.error("command.failed", command=args.command, error_type=type(err).__name__, exit_code=err.exit_code,
                      reason=getattr(err, "reason", None))
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
    return run


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add train-student, evaluate and release; each sets ``func`` (args -> exit code, errors -> err.exit_code)."""
    def common(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = subparsers.add_parser(name, help=help_)
        sp.add_argument("--config", type=Path, required=True, help="coordinator.yaml (its state_dir holds the ledger)")
        sp.add_argument("--training", type=Path, required=True, help="student training YAML (TrainingConfig)")
        sp.add_argument("--workdir", type=Path, required=True, help="coordinator work dir for student stages")
        sp.set_defaults(func=_guard(fn))
        return sp

    common("train-student", _train, "train the student on every accepted shard (no-op if none is new)").add_argument(
        "--force", action="store_true", help="re-train even if nothing changed")
    common("evaluate", _evaluate, "sample the student; utility on the public reference set").add_argument(
        "--force", action="store_true", help="re-evaluate even if nothing changed")
    rel = common("release", _release, "release the student with a model card (refused if the policy fails)")
    rel.add_argument("--out", type=Path, required=True, help="releases directory; a new <name>-v<N> is created in it")
    rel.add_argument("--site-evidence", type=Path, action="append", default=[], metavar="PATH",
                     help="a site's signed student attestation (its student-eval/ folder or attestation.json with "
                          "attestation.sig beside it); repeat per site; needed by max_student_mia_auc / "
                          "max_student_memorization_rate")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m coordinator.student_cli``); the coordinator CLI mounts the same commands."""
    from privdistill.logs import configure_logging

    p = argparse.ArgumentParser(prog="privdistill-coordinator")
    p.add_argument("--log-format", choices=["console", "json"], default="console")
    sub = p.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = p.parse_args(argv)
    configure_logging(args.log_format, "info")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
