"""The site's SuperNode launcher (site_agent.supernode): Flower's loop gets the short idle pull only on the release it
was checked against, only its fixed 3 s sleep changes, and the launcher hands Flower its own arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import flwr.supernode.start_client_internal as loop
import pytest

from site_agent import supernode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def flower_loop(monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.setattr(loop, "time", time)  # whatever a test does to the module is undone after it
    return loop


def test_only_the_fixed_idle_sleep_is_shortened() -> None:
    slept: list[float] = []
    clock = supernode.ShortIdleSleep(0.5, sleep=slept.append)
    for seconds in (3, 0.5, 2.9, 3.0):
        clock.sleep(seconds)
    assert slept == [0.5, 0.5, 2.9, 0.5]
    assert abs(clock.monotonic() - time.monotonic()) < 1 and clock.time is time.time  # the rest is the real module


def test_the_pinned_flower_release_gets_the_short_idle_pull(flower_loop: object) -> None:
    assert supernode.shorten_idle_pull(0.25) is None
    assert isinstance(loop.time, supernode.ShortIdleSleep)
    t = time.monotonic()
    loop.time.sleep(3)  # the loop's idle sleep, as Flower calls it
    assert time.monotonic() - t < 1.5


def test_an_unchecked_release_or_a_changed_loop_is_left_alone(flower_loop: object,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supernode, "version", lambda _name: "1.42.0")
    assert "flwr 1.42.0 is not a release this was checked against" in str(supernode.shorten_idle_pull())
    assert loop.time is time
    monkeypatch.setattr(supernode, "version", lambda _name: "1.41.0")
    monkeypatch.setattr(supernode.inspect, "getsource", lambda _obj: "while True:\n    time.sleep(5)\n")
    assert "no longer has exactly one time.sleep(3)" in str(supernode.shorten_idle_pull())
    assert loop.time is time


def test_the_launcher_runs_flowers_own_command_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "site_agent.supernode", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: flower-supernode" in proc.stdout and "--superlink" in proc.stdout
    assert "idle pull" not in proc.stderr  # the pinned release was patched, no warning
