"""`federate` drives the Flower CLI (`flwr run / ls / log / stop`); on a loaded machine one of those calls can hang.
With a stand-in `flwr` (a script that answers like the real one, and hangs where told): a hung status call is asked
again instead of ending the run, a hung log call loses only the log, a hung `flwr run` is a clear retryable error."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from coordinator import federate
from privdistill.errors import RetryableNetworkError, StageError

FAKE = """#!/bin/sh
# stand-in flwr: HANG_ON names the subcommand that hangs (once per mark file); every call is appended to calls.log
dir=$(dirname "$0")
echo "$1" >> "$dir/calls.log"
if [ "$1" = "$HANG_ON" ] && [ ! -e "$dir/hung-$1" ]; then touch "$dir/hung-$1"; exec sleep 30; fi
case "$1" in
  run) echo 'Loading...'; echo '{"success": true, "run-id": 42}' ;;
  ls) n=$(grep -c '^ls$' "$dir/calls.log")
      if [ "$n" -ge "${FINISH_AT:-2}" ]; then echo '{"runs": [{"status": "finished:completed", "status-details": ""}]}'
      else echo '{"runs": [{"status": "running", "status-details": ""}]}'; fi ;;
  log) echo "ServerApp log line" ;;
  stop) echo stopped ;;
esac
"""


@pytest.fixture()
def fake_flwr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "flwr"
    script.write_text(FAKE)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(federate, "tool", lambda name: str(bin_dir / name))
    monkeypatch.setattr(federate.time, "sleep", lambda s: None)  # the 2 s status poll
    real_flwr = federate._flwr

    def quick(env: dict[str, str], *args: str, timeout: float = 60) -> object:  # the 30 s hangs, cut at 1.5 s
        return real_flwr(env, *args, timeout=min(timeout, 1.5))

    monkeypatch.setattr(federate, "_flwr", quick)
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return bin_dir


def _calls(bin_dir: Path) -> list[str]:
    return (bin_dir / "calls.log").read_text().split()


def _run(bin_dir: Path, env: dict[str, str], timeout: float = 60) -> dict:
    return federate.run_app(env, bin_dir.parent / "app", {"out": "x"}, timeout=timeout,
                            log_path=bin_dir.parent / "runs.log")


def test_a_hung_status_call_is_asked_again_and_the_run_completes(fake_flwr: Path) -> None:
    res = _run(fake_flwr, {"PATH": "/usr/bin:/bin", "HANG_ON": "ls", "FINISH_AT": "3"})
    assert res == {"run_id": "42", "status": "finished:completed", "details": ""}
    assert _calls(fake_flwr) == ["run", "ls", "ls", "ls", "log"]  # the first ls hung and was asked again
    assert "ServerApp log line" in (fake_flwr.parent / "runs.log").read_text()


def test_a_hung_log_call_keeps_the_result_and_says_why_the_log_is_missing(fake_flwr: Path) -> None:
    res = _run(fake_flwr, {"PATH": "/usr/bin:/bin", "HANG_ON": "log"})
    assert res["status"] == "finished:completed"
    assert "no ServerApp log: `flwr log" in (fake_flwr.parent / "runs.log").read_text()


def test_a_hung_submit_is_a_retryable_error_naming_the_command(fake_flwr: Path) -> None:
    with pytest.raises(RetryableNetworkError, match=r"`flwr run .*did not finish within 2 s"):
        _run(fake_flwr, {"PATH": "/usr/bin:/bin", "HANG_ON": "run"})


def test_a_run_past_its_timeout_is_stopped_and_reported(fake_flwr: Path) -> None:
    with pytest.raises(StageError, match="did not finish within 0 s .*it was stopped"):
        _run(fake_flwr, {"PATH": "/usr/bin:/bin", "FINISH_AT": "99"}, timeout=0)
    assert _calls(fake_flwr)[-1] == "stop"
    with pytest.raises(StageError, match="run `flwr stop 42`"):  # and when stopping hangs too, says what to do
        _run(fake_flwr, {"PATH": "/usr/bin:/bin", "FINISH_AT": "99", "HANG_ON": "stop"}, timeout=0)
    assert json.dumps(_calls(fake_flwr)).count("stop") == 2
