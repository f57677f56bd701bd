"""The shared command-line base (exit codes from the error classes, one dispatch style, an error reported once),
read-only list commands, the shared audit-log writer and the named seed streams."""

from __future__ import annotations

import argparse
import json
import re
import threading
from pathlib import Path

import pytest
import yaml

from privdistill import errors
from privdistill.audit_log import AuditLog
from privdistill.cli_base import EPILOG
from privdistill.seeds import STREAMS, derive_seed

ROOT = Path(__file__).resolve().parents[1]


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from coordinator.cli import build_parser as coordinator_parser
    from privdistill.cli import build_parser as run_parser
    from site_agent.cli import build_parser as site_parser

    return {"privdistill": run_parser(), "privdistill-site": site_parser(),
            "privdistill-coordinator": coordinator_parser()}


def _leaves(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, p)]
    return [leaf for name, sp in subs[0].choices.items() for leaf in _leaves(sp, (*path, name))]


def test_exit_codes_come_from_the_error_classes_and_every_command_line_prints_the_same_help() -> None:
    codes = [cls.exit_code for cls in errors.ERROR_CLASSES]
    assert len(set(codes)) == len(codes) == 7  # one code per party that must act
    assert list(errors.EXIT_CODES) == [0, 1, 2, 3, 4, 5, 6, 7, 130]
    assert errors.EXIT_CODES[6] == errors.RetryableNetworkError.help
    for prog, parser in _parsers().items():
        assert parser.epilog == EPILOG, prog
        assert all(f"  {code:>3}  {text}" in parser.format_help() for code, text in errors.EXIT_CODES.items())
    # the README's table documents the same codes
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Exit codes"):].split("\n\n")[1]
    assert [int(c) for c in re.findall(r"^\| (\d+) \|", table, flags=re.M)] == list(errors.EXIT_CODES)


def test_every_command_dispatches_through_set_defaults() -> None:
    for prog, parser in _parsers().items():
        leaves = _leaves(parser)
        assert len(leaves) >= 8, prog
        for path, sp in leaves:
            assert callable(sp.get_default("func")), f"{prog} {' '.join(path)} has no func"


def test_reason_is_part_of_the_error_classes() -> None:
    assert errors.PrivacyPolicyError("refused", "site_revoked").reason == "site_revoked"
    assert errors.PrivacyPolicyError("refused").reason == "policy_refused"
    assert errors.ShardVerificationError("bad", reason="bad_signature").reason == "bad_signature"
    assert errors.ConfigError(["x"]).reason == "config_invalid"
    assert len({cls.reason for cls in errors.ERROR_CLASSES}) == len(errors.ERROR_CLASSES)


def _typo_coordinator_config(tmp_path: Path) -> tuple[Path, Path]:
    cfg = tmp_path / "coordinator.yaml"
    cfg.write_text(yaml.safe_dump({"tls": {"cert": "server.pem", "key": "server.key"}, "state_dir": "stat"}))
    return cfg, tmp_path / "stat"


@pytest.mark.parametrize("argv", [["shards", "list"], ["shards", "list", "--all", "--json"], ["sites", "list"]])
def test_coordinator_list_commands_create_no_ledger(tmp_path: Path, argv: list[str],
                                                    capsys: pytest.CaptureFixture) -> None:
    from coordinator.cli import main

    cfg, typo = _typo_coordinator_config(tmp_path)
    assert main([*argv, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"no ledger at {typo / 'ledger.sqlite'}: check state_dir" in err
    assert err.count("error:") == 1 and err.count("no ledger at") == 1  # reported once, not logged and printed
    assert not typo.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coordinator.yaml"]


def test_coordinator_list_reads_an_existing_ledger_without_writing_it(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from coordinator.cli import main
    from coordinator.ledger import Ledger
    from privdistill.identity import generate_key, public_key_b64

    cfg, state = _typo_coordinator_config(tmp_path)
    Ledger(state / "ledger.sqlite").add_site("hospital-a", public_key_b64(generate_key()))
    before = (state / "ledger.sqlite").read_bytes()
    assert main(["sites", "list", "--json", "--config", str(cfg)]) == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)] == ["hospital-a"]
    assert main(["shards", "list", "--config", str(cfg)]) == 0
    assert (state / "ledger.sqlite").read_bytes() == before
    ro = Ledger(state / "ledger.sqlite", read_only=True)
    with pytest.raises(Exception, match="readonly"):
        ro.record_event("rejected", site="hospital-a", reason="x")


def test_site_shards_with_a_mistyped_workdir_exits_2_and_creates_nothing(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from site_agent.cli import main

    typo = tmp_path / "wrok"
    assert main(["shards", "--workdir", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"no ledger at {typo / 'site_state.sqlite'}: check --workdir" in err and err.count("error:") == 1
    assert not typo.exists()
    # a work directory that exists but has packaged nothing: an empty list, still nothing written
    (tmp_path / "work").mkdir()
    assert main(["shards", "--workdir", str(tmp_path / "work"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert list((tmp_path / "work").iterdir()) == []


def test_json_log_format_reports_the_error_as_one_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from coordinator.cli import main

    cfg, _ = _typo_coordinator_config(tmp_path)
    assert main(["--log-format", "json", "shards", "list", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error:" not in err
    (record,) = [json.loads(line) for line in err.splitlines() if "no ledger at" in line]
    assert (record["event"], record["command"], record["exit_code"], record["reason"]) == \
        ("failed", "shards list", 2, "config_invalid")


def test_audit_log_appends_whole_lines_from_concurrent_writers(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "sub" / "audit.log", {"exported", "accepted"})
    assert log.read() == []

    def write(k: int) -> None:
        for i in range(25):
            log.append("exported", shard_id=f"s{k}-{i}", path=tmp_path)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    records = log.read()
    assert len(records) == 100 and len({r["shard_id"] for r in records}) == 100
    assert all(set(r) == {"time", "event", "shard_id", "path"} and r["path"] == str(tmp_path) for r in records)
    with pytest.raises(ValueError, match="unknown audit event 'exportd'"):
        log.append("exportd")
    with pytest.raises(ValueError, match="set by the audit log"):
        log.append("accepted", time="yesterday")
    assert len(log.read()) == 100


def test_both_audit_logs_use_the_shared_writer(tmp_path: Path) -> None:
    from coordinator.audit_log import AuditLog as CoordinatorAuditLog
    from site_agent.audit_log import audit, read_audit

    rec = CoordinatorAuditLog(tmp_path / "state").event("accepted", site="a", shard_sha256="ab" * 32)
    assert set(rec) == {"time", "event", "site", "shard_sha256", "reason"}
    audit(tmp_path / "work", "approved", shard_id="s1", operator="alice")
    (site_rec,) = read_audit(tmp_path / "work")
    assert (site_rec["event"], site_rec["operator"], site_rec["shard_id"]) == ("approved", "alice", "s1")
    assert site_rec["time"] >= rec["time"]


def test_seed_streams_are_fixed_distinct_and_named() -> None:
    # fixed values: a changed hash would silently change every seeded number in the project
    assert derive_seed(0, "teacher-samples") == 965326097
    assert derive_seed(0, "lira-shadow", 1) == 583906406
    seeds = {derive_seed(s, name) for s in (0, 1, 2) for name in STREAMS}
    assert len(seeds) == 3 * len(STREAMS)
    assert len({derive_seed(0, "lira-shadow", k) for k in range(64)}) == 64
    assert all(0 <= s < 2**31 for s in seeds)
    with pytest.raises(ValueError, match="unknown seed stream 'student-sample'"):
        derive_seed(0, "student-sample")
