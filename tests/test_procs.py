"""Helpers bound to the command that started them (privdistill.procs): a parent killed with SIGKILL takes its bound
helper down (and, as the control, an unbound one survives it); a parent already gone makes the child exit; SIGTERM to
a CLI command runs its cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _fixtures import process_running

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_running(pid):
            return True
        time.sleep(0.05)
    return False


def _parent_with_helper(bound: bool, marker: str) -> tuple[subprocess.Popen, int]:
    """A parent process that starts a sleeping helper (bound or not) and prints the helper's pid."""
    code = ("import subprocess, sys, time\n"
            "from privdistill.procs import bound_to_this_process\n"
            f"cmd = [sys.executable, '-c', 'import time; time.sleep(60)  # {marker}']\n"
            f"p = subprocess.Popen(bound_to_this_process(cmd) if {bound} else cmd)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 20  # until the wrapper has exec'd the helper itself
    while marker not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
        assert time.monotonic() < deadline, "the helper never started"
        time.sleep(0.02)
    return parent, pid


@pytest.mark.timeout(60)
def test_a_bound_helper_ends_when_its_parent_is_killed_and_an_unbound_one_does_not() -> None:
    parent, helper = _parent_with_helper(True, "bound-helper")
    assert Path(f"/proc/{helper}/cmdline").read_bytes().split(b"\0")[0] == sys.executable.encode()
    parent.kill()
    parent.wait(timeout=10)
    assert _wait_gone(helper, 10), "the bound helper outlived its SIGKILLed parent"

    parent, helper = _parent_with_helper(False, "unbound-helper")  # the control: what happened before
    try:
        parent.kill()
        parent.wait(timeout=10)
        assert not _wait_gone(helper, 1.0), "an unbound helper should survive; the check above proves nothing"
    finally:
        os.kill(helper, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    # end_with_parent(expected) with an expected parent that is not the real one = it died before the call
    proc = subprocess.run([sys.executable, "-c", "from privdistill.procs import end_with_parent\n"
                           "end_with_parent(1)\nprint('still running')"], capture_output=True, text=True, env=_env(),
                          timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and "still running" not in proc.stdout


def test_the_wrapper_names_a_command_it_cannot_run_and_rejects_bad_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "privdistill.procs", str(os.getpid()), "--",
                           "/nonexistent/flower-superlink"], capture_output=True, text=True, env=_env(), timeout=30)
    assert proc.returncode != 0 and "/nonexistent/flower-superlink" in proc.stderr
    assert "No such file" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "privdistill.procs", "not-a-pid", "true"], capture_output=True,
                          text=True, env=_env(), timeout=30)
    assert proc.returncode != 0 and "usage:" in proc.stderr


@pytest.mark.timeout(60)
def test_sigterm_to_a_command_runs_its_cleanup(tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    code = ("import argparse, sys, time\n"
            "from privdistill import cli_base\n"
            "def func(args):\n"
            "    try:\n"
            "        print('started', flush=True)\n"
            "        time.sleep(60)\n"
            "    finally:\n"
            f"        open({str(marker)!r}, 'w').write('yes')\n"
            "    return 0\n"
            "sys.exit(cli_base.run(argparse.Namespace(func=func)))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert marker.read_text() == "yes"
