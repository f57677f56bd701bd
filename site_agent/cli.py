"""`privdistill-site`: run the site's stages, package, approve and export shards, read the audit trail."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import structlog

from privdistill import cli_base
from privdistill.errors import (
    ConfigError,
    PrivacyPolicyError,
    RetryableNetworkError,
    ShardVerificationError,
)
from privdistill.workdir import FILTER, INGEST, SAMPLE, TRAIN_REID, TRAIN_TEACHER

SITE_STAGES = (INGEST, TRAIN_TEACHER, TRAIN_REID, SAMPLE, FILTER)  # the pipeline up to the filter
CONFIG_NAME = "site.yaml"
log = structlog.get_logger("site_agent.cli")


def build_parser() -> argparse.ArgumentParser:
    p, sub = cli_base.root_parser(
        "privdistill-site", "Site agent: train and filter inside the hospital; export only approved, signed shards.")

    def cmd(name: str, func: cli_base.Command, help: str, *, config: str = "required", **kw: Any) -> argparse.ArgumentParser:
        """A command on the site's work directory; ``config``: required, optional (validated when given) or none."""
        sp = cli_base.command(sub, name, func, help, **kw)
        cli_base.add_workdir(sp, help="the site's work directory")
        if config != "none":
            cli_base.add_config(sp, optional=config == "optional", help=f"the site config ({CONFIG_NAME})" +
                                (" (optional: validated when given)" if config == "optional" else ""))
        return sp

    sp = cli_base.command(sub, "init", _init, f"write a commented {CONFIG_NAME} template into DIR")
    sp.add_argument("dir", type=Path)
    sp.add_argument("--connection", type=Path, help="the provisioned site-connection.yaml: fills the site: section")
    cli_base.add_force(sp, help=f"overwrite an existing {CONFIG_NAME}")
    sp = cmd("run", _run, "ingest, train teacher and re-id, sample, filter, then package a shard")
    cli_base.add_force(sp, help="re-run every stage even if inputs are unchanged")
    cmd("status", _status, "stages and shards of a work directory")
    cli_base.add_json(cmd("shards", _shards, "list packaged shards", config="optional"))
    sp = cmd("approve", _approve, "approve a packaged shard for export (data steward)", config="none")
    sp.add_argument("shard")
    sp.add_argument("--by", help="who approves (default: the OS user)")
    sp = cmd("reject", _reject, "reject a shard for good", config="none")
    sp.add_argument("shard")
    sp.add_argument("--reason", required=True)
    sp.add_argument("--by", help="who rejects (default: the OS user)")
    cmd("export", _export, "upload approved shards (all not yet exported, or SHARD)").add_argument("shard", nargs="?")
    cli_base.add_json(cmd("audit-log", _audit_log, "print the audit trail", config="optional"))
    cmd("evaluate-student", _evaluate_student, "measure a released student on this site's own data").add_argument(
        "model_dir", type=Path)
    sp = cmd("join", _join, "federated mode: run this site's Flower SuperNode (trains only on the approved shard, "
                            "behind the export gate)")
    sp.add_argument("--superlink", help="SuperLink HOST:PORT (default: the coordinator's host, port 9092)")
    sp.add_argument("--node-key", type=Path, help="Flower node key (default: flower-node.key beside site.key)")
    sp.add_argument("--runtime-port", type=int, help="local port of the SuperNode's runtime API (default: free port)")
    sp = cmd("doctor", _doctor, "preflight: config, keys, certificates, coordinator, data source, disk, GPU",
             description="Checks a site install before its first run. Exit codes: 0 every check passed "
                         "(warnings allowed), 1 at least one check failed, 2 the config does not validate.")
    cli_base.add_json(sp)
    sp.add_argument("--offline", action="store_true", help="skip the coordinator and PACS checks")
    sp.add_argument("--timeout", type=float, default=10.0, help="seconds per network check")
    sp = cmd("ui", _ui, "the data steward's review page (shards, images, privacy report, approve/reject)",
             description="Serve the review page on HOST:PORT. Log in with the access token (from --token-file, or "
                         "generated and printed once on stderr). Approvals and rejections made there are audited as "
                         "by 'ui:NAME' (NAME: the name given at login, else the OS user).")
    sp.add_argument("--host", default="127.0.0.1", help="listen address (default loopback; anything else is warned "
                                                        "about: the page shows real images)")
    sp.add_argument("--port", type=int, default=8765)
    sp.add_argument("--token-file", type=Path, help="file holding the access token (mode 0600); default: generate one")
    sp.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a host name the page may be reached by besides localhost/127.0.0.1/::1 (e.g. the "
                         "hospital proxy's name); repeatable. Other Host headers are refused (DNS rebinding)")
    return p


# ----------------------------------------------------------------------------- commands
def _init(args: argparse.Namespace) -> int:
    from privdistill.stages import atomic_write_text
    from site_agent.config import read_connection, render_template

    out = args.dir / CONFIG_NAME
    if out.exists() and not args.force:
        raise ConfigError([f"{out} already exists; edit it, or pass --force to overwrite it"])
    connection = read_connection(args.connection) if args.connection else None
    atomic_write_text(out, render_template(connection))
    print(f"wrote {out}: fill every CHANGE-ME, then `privdistill-site run {out} --workdir WORKDIR`")
    return 0


def _site_key(cfg: Any) -> Any:
    from privdistill.identity import load_private_key

    if not cfg.site.key_file.is_file():  # production configs were refused already
        return None
    return load_private_key(cfg.site.key_file)


def _run(args: argparse.Namespace) -> int:
    from privdistill.pipeline import run_pipeline
    from privdistill.stages import run_stage, workdir_lock
    from site_agent.config import load_site_config
    from site_agent.package import build_package_stage
    from site_agent.records import stage_record_key

    cfg = load_site_config(args.config)
    key = _site_key(cfg)
    record_key = None if key is None else stage_record_key(key)  # stage records the gate can authenticate
    run_pipeline(cfg, args.workdir, stages=list(SITE_STAGES), force=args.force, record_key=record_key)
    if key is None:
        log.warning("package.skipped", reason="site.key_file missing (production: false)")
        print("NOT PACKAGED: no site key (site.key_file); provision the site to package and export shards",
              file=sys.stderr)
        return 0
    with workdir_lock(args.workdir):
        record = run_stage(build_package_stage(cfg, args.workdir, key=key), args.workdir, force=args.force,
                           record_key=record_key)
    rep = record["report"]
    sid, verdict, pv = rep["shard_id"], rep["policy"], rep["privacy"]
    print(f"shard {sid}: {rep['state']}; policy {'passed' if verdict['passed'] else 'FAILED: ' + ', '.join(verdict['failed'])}")
    print(f"  kept {pv['kept']} of {pv['n_synthetic']} synthetic images; memorization kept {pv['kept_memorization_rate']:.3f}"
          f" / all teacher samples {pv['teacher_memorization_rate']:.3f}; re-id teacher {pv['teacher_reid_rate']:.3f}"
          f" / kept {pv['kept_reid_rate']:.3f}")
    if not verdict["passed"]:
        print("  this shard can never be exported; change the training/filter settings and run again", file=sys.stderr)
        return PrivacyPolicyError.exit_code
    if rep["state"] == "packaged":
        print(f"  review it on the review page (`privdistill-site ui {args.config} --workdir {args.workdir}`), or "
              f"look at {args.workdir / 'filter' / 'review'} and {args.workdir / 'shards' / sid}, then:\n"
              f"  privdistill-site approve {sid} --workdir {args.workdir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from privdistill.pipeline import build_stage
    from privdistill.stages import is_current, read_record
    from site_agent.config import load_site_config
    from site_agent.package import PACKAGE, build_package_stage

    cfg = load_site_config(args.config)
    key = _site_key(cfg)
    for name in (*SITE_STAGES, PACKAGE):
        done = read_record(args.workdir, name) is not None
        if name == PACKAGE:
            current = key is not None and is_current(build_package_stage(cfg, args.workdir, key=key), args.workdir)
        else:
            current = is_current(build_stage(cfg, name), args.workdir)
        print(f"{name:<14} {'up to date' if current else ('stale' if done else 'not run')}")
    print()
    _print_shards(_shard_rows(args.workdir) if args.workdir.is_dir() else [])
    return 0


def _shard_table(rows: list[Any]) -> str:
    lines = [f"{'shard':<34} {'state':<9} {'samples':>7}  {'policy':<28} {'approved_by':<14} exported"]
    for r in rows:
        pol = "passed" if r.policy_passed else "FAILED " + ",".join(r.policy.get("failed", []))
        lines.append(f"{r.shard_id:<34} {r.state:<9} {r.sample_count:>7}  {pol:<28} {r.approved_by or '-':<14} "
                     f"{r.exported_at or '-'}")
    return "\n".join(lines)


def _check_optional_config(args: argparse.Namespace) -> None:
    from site_agent.config import load_site_config

    if getattr(args, "config", None) is not None:
        load_site_config(args.config)


def _shards(args: argparse.Namespace) -> int:
    _check_optional_config(args)
    _print_shards(_shard_rows(args.workdir), as_json=args.json)
    return 0


def _shard_rows(workdir: Path) -> list[Any]:
    """The register's shards, read-only: none in a work directory that has packaged nothing yet; exit 2 (and
    nothing created) for a work directory that does not exist."""
    from site_agent.state import STATE_FILE, SiteState

    if workdir.is_dir() and not (workdir / STATE_FILE).exists():
        return []
    return SiteState(workdir, read_only=True).list()


def _print_shards(rows: list[Any], *, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps([r.public() for r in rows], indent=2))
    elif rows:
        print(_shard_table(rows))
    else:
        print("no shards yet: `privdistill-site run CONFIG --workdir WORKDIR` packages one")


def _approve(args: argparse.Namespace) -> int:
    from site_agent.approval import approve_shard

    row = approve_shard(args.workdir, args.shard, by=args.by)
    print(f"approved {row.shard_id} ({row.sample_count} samples) by {row.approved_by}; export with "
          f"`privdistill-site export CONFIG {row.shard_id} --workdir {args.workdir}`")
    return 0


def _reject(args: argparse.Namespace) -> int:
    from site_agent.approval import reject_shard

    row = reject_shard(args.workdir, args.shard, reason=args.reason, by=args.by)
    print(f"rejected {row.shard_id}: {row.reason}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from privdistill.identity import load_private_key
    from site_agent.config import load_site_config
    from site_agent.export import export_shard
    from site_agent.gate import exportable

    cfg = load_site_config(args.config)
    targets = [args.shard] if args.shard else exportable(args.workdir)
    if not targets:
        print("nothing to export: no approved shard waits (see `privdistill-site shards`)")
        return 0
    key = load_private_key(cfg.site.key_file)
    rc = 0
    for ref in targets:
        try:
            done = export_shard(args.workdir, ref, cfg, key)
        except RetryableNetworkError as err:
            print(f"NOT SENT {ref}: {err}; run export again later (the upload resumes)", file=sys.stderr)
            rc = rc or err.exit_code
            continue
        except (PrivacyPolicyError, ShardVerificationError) as err:
            print(f"REFUSED {ref}: {err}", file=sys.stderr)
            rc = rc or err.exit_code
            continue
        m = done.manifest
        print(f"exported {done.shard_id}: {m.sample_count} samples, {m.tar_size} bytes -> {cfg.site.coordinator_url}"
              f"{' (already there)' if done.duplicate else ''}")
    return rc


def _audit_log(args: argparse.Namespace) -> int:
    from site_agent.audit_log import format_table, read_audit

    _check_optional_config(args)
    records = read_audit(args.workdir)
    if args.json:
        for r in records:
            print(json.dumps(r, sort_keys=True))
    else:
        print(format_table(records) if records else "no audit records yet")
    return 0


def _evaluate_student(args: argparse.Namespace) -> int:
    from site_agent.config import load_site_config
    from site_agent.student_eval import REPORT_DIR, evaluate_student

    rep = evaluate_student(load_site_config(args.config), args.workdir, args.model_dir)

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "n/a"

    for who in ("teacher", "student"):
        m = rep[who]
        if m is not None:
            print(f"{who} on site {rep['site_id']}: memorization_rate {fmt(m['memorization_rate'])}, reid_rate "
                  f"{fmt(m['reid_rate'])}, tstr_accuracy {fmt(m['tstr_accuracy'])}, mia_auc {fmt(m.get('mia_auc'))} "
                  f"({m['n_samples']} samples)")
    print(f"report: {args.workdir / REPORT_DIR / 'report.json'}")
    return 0


def _join(args: argparse.Namespace) -> int:
    from site_agent.config import load_site_config
    from site_agent.join import default_superlink, join

    cfg = load_site_config(args.config)
    print(f"site {cfg.site.id} joining the federation at {args.superlink or default_superlink(cfg)} (Ctrl-C leaves)",
          flush=True)
    return join(cfg, args.config, args.workdir, superlink=args.superlink, node_key=args.node_key,
                runtime_port=args.runtime_port)


def _ui(args: argparse.Namespace) -> int:
    from site_agent.config import load_site_config
    from site_agent.ui.server import serve_ui

    return serve_ui(load_site_config(args.config), args.workdir, host=args.host, port=args.port,
                    token_file=args.token_file, allowed_hosts=args.allowed_host)


def _doctor(args: argparse.Namespace) -> int:
    from site_agent.doctor import format_report, run_doctor

    report = run_doctor(args.config, args.workdir, timeout_s=args.timeout, network=not args.offline)
    print(json.dumps(report.public(), indent=2) if args.json else format_report(report))
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    return cli_base.main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
