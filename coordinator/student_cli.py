"""`privdistill-coordinator train-student | evaluate | release`: the student side of the coordinator CLI.
Each command reads the accepted shards from the ledger and returns an exit code (err.exit_code on failure)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from privdistill import cli_base


def _accepted(config_path: Path) -> tuple[Path, list[Any]]:
    """(state_dir, ShardRefs of every accepted shard, with the hashes the ledger accepted)."""
    from coordinator.config import load_coordinator_config
    from coordinator.ledger import Ledger
    from coordinator.student import ShardRef

    ccfg = load_coordinator_config(config_path)
    shards = Ledger(ccfg.ledger_path, read_only=True).accepted_shards()
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

    ledger = Ledger(load_coordinator_config(config_path).ledger_path, read_only=True)
    return {s.name: s.public_key for s in ledger.sites() if not s.revoked}


def _release(args: argparse.Namespace) -> int:
    from coordinator.audit_log import AuditLog
    from coordinator.release import RELEASE_FILE, release
    from coordinator.student import load_training_config

    cfg = load_training_config(args.training)
    state_dir, shards = _accepted(args.config)
    path = release(args.workdir, args.out, cfg, shards=shards, site_evidence=args.site_evidence,
                   site_keys=_site_keys(args.config))
    rec = json.loads((path / RELEASE_FILE).read_text())
    AuditLog(state_dir).event("released", name=rec["name"], version=rec["version"], path=str(path),
                              shards=[s["tar_sha256"] for s in rec["training_data"]["shards"]],
                              sites=rec["training_data"]["sites"])
    print(f"released {rec['name']} v{rec['version']}:")
    print(path)  # last line: the release directory (scripts read it)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add train-student, evaluate and release (each ``cli_base.command``: args -> exit code)."""
    def common(name: str, fn: cli_base.Command, help_: str) -> argparse.ArgumentParser:
        sp = cli_base.command(subparsers, name, fn, help_)
        cli_base.add_config(sp, option=True, help="coordinator.yaml (its state_dir holds the ledger)")
        sp.add_argument("--training", type=Path, required=True, help="student training YAML (TrainingConfig)")
        cli_base.add_workdir(sp, help="coordinator work dir for student stages")
        return sp

    cli_base.add_force(common("train-student", _train, "train the student on every accepted shard (no-op if none is "
                                                       "new)"), help="re-train even if nothing changed")
    cli_base.add_force(common("evaluate", _evaluate, "sample the student; utility on the public reference set"),
                       help="re-evaluate even if nothing changed")
    rel = common("release", _release, "release the student with a model card (refused if the policy fails)")
    rel.add_argument("--out", type=Path, required=True, help="releases directory; a new <name>-v<N> is created in it")
    rel.add_argument("--site-evidence", type=Path, action="append", default=[], metavar="PATH",
                     help="a site's signed student attestation (its student-eval/ folder or attestation.json with "
                          "attestation.sig beside it); repeat per site; needed by max_student_mia_auc / "
                          "max_student_memorization_rate")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m coordinator.student_cli``); the coordinator CLI mounts the same commands."""
    p, sub = cli_base.root_parser("privdistill-coordinator", "The coordinator's student commands.")
    add_commands(sub)
    return cli_base.main(p, argv)


if __name__ == "__main__":
    sys.exit(main())
