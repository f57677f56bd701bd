"""Shared by the browser tests: a real server process on a free loopback port, and headless Debian chromium
driven by Playwright (never `playwright install`: the system browser, offline)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from _require import missing

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 15_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(args: list[str], health_url: str, log_dir: Path, *, verify: Any = True,
           timeout_s: float = 60) -> Iterator[subprocess.Popen]:
    """``python -m <args>`` until ``health_url`` answers 200; killed (TERM, then KILL) on exit."""
    out, err = (log_dir / "server.out").open("wb"), (log_dir / "server.err").open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=err, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {(log_dir / 'server.err').read_text()[-3000:]}")
            try:
                if httpx.get(health_url, timeout=2, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not healthy after {timeout_s} s: "
                                     f"{(log_dir / 'server.err').read_text()[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        stop(proc)
        out.close()
        err.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def browser() -> Iterator[Any]:
    """A headless chromium browser (skips locally / fails in CI when chromium is missing)."""
    if not Path(CHROMIUM).is_file():
        missing("chromium", "apt-get install chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=WAIT_MS * 2)
        try:
            yield b
        finally:
            b.close()


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page PNG in tmp_path, copied to $PRIVDISTILL_SCREENSHOT_DIR when set (the README's screenshots)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True, timeout=WAIT_MS)
    assert path.stat().st_size > 1000
    target = os.environ.get("PRIVDISTILL_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    return path
