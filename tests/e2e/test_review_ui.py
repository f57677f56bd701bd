"""`privdistill-site ui` as a real process, driven in headless chromium: log in with the token, see the packaged
shard's images and the filter's evidence, approve it, see the state and the audit record change; refusals
(no session, no CSRF token) checked with plain HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from _fixtures import FMNIST
from test_ui import N_DROPPED, TOKEN, review_site

from ._browser import WAIT_MS, browser, free_port, screenshot, server, stop

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")]


@pytest.fixture
def ui(tmp_path: Path, reid_src: Path) -> Any:
    site = review_site(tmp_path / "site", reid_src)
    token_file = tmp_path / "ui_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["site_agent.cli", "ui", str(site.config_path), "--workdir", str(site.workdir), "--port", str(port),
            "--token-file", str(token_file)]
    with server(args, f"{base}/healthz", tmp_path):
        yield site, base


@pytest.mark.timeout(300)
def test_steward_reviews_and_approves_a_shard_in_the_browser(ui: Any, tmp_path: Path) -> None:
    from site_agent.audit_log import read_audit
    from site_agent.state import SiteState

    site, base = ui
    with browser() as b:
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(WAIT_MS)
        page.goto(f"{base}/")
        assert page.url == f"{base}/login", "without a session the page sends you to the login form"
        page.fill("input[name=token]", "not-the-token-at-all")
        page.click("button[type=submit]")
        assert "wrong access token" in page.inner_text("[role=alert]")
        page.fill("input[name=token]", TOKEN)
        page.fill("input[name=name]", "steward")
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/")
        row = page.locator(f"tr[data-shard='{site.shard_id}']")
        assert row.locator(".state").inner_text() == "packaged"
        screenshot(page, tmp_path, "site-review-shards.png")

        row.locator("a").click()
        page.wait_for_url(f"{base}/shards/{site.shard_id}")
        row_before = SiteState(site.workdir).require(site.shard_id)
        assert page.locator("#grid img").count() == row_before.sample_count == 12 - N_DROPPED
        assert all(page.locator("#grid img").nth(i).evaluate("e => e.complete && e.naturalWidth == 28")
                   for i in range(row_before.sample_count)), "every grid image decodes in the browser"
        assert page.locator("svg.histogram rect.bar").count() >= 1
        assert page.locator("svg.histogram line.threshold").count() == 1
        assert page.locator("#pairs figure").count() == N_DROPPED
        assert page.inner_text("#verdict") == "passed"
        screenshot(page, tmp_path, "site-review-shard.png")

        page.click("#approve")
        page.wait_for_url(f"{base}/shards/{site.shard_id}")
        assert page.inner_text("#state") == "approved"
        assert page.locator("#approve").count() == 0
        page.click("text=Audit log")
        page.wait_for_url(f"{base}/audit")
        approved = page.locator("tr.event-approved")
        assert approved.count() == 1 and "ui:steward" in approved.inner_text()
        screenshot(page, tmp_path, "site-review-audit.png")
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}

    row = SiteState(site.workdir).require(site.shard_id)
    assert (row.state, row.approved_by) == ("approved", "ui:steward")
    rec = [r for r in read_audit(site.workdir) if r["event"] == "approved"]
    assert len(rec) == 1 and rec[0]["by"] == "ui:steward" and rec[0]["shard_id"] == site.shard_id

    # refusals, over plain HTTP against the same process
    with httpx.Client(base_url=base, timeout=10) as anon:
        assert anon.get("/").status_code == 303
        assert anon.post(f"/shards/{site.shard_id}/reject", data={"reason": "x", "csrf": "x"}).status_code == 401
    with httpx.Client(base_url=base, timeout=10, cookies=cookies) as steward:
        assert steward.get("/").status_code == 200, "the browser's session cookie works"
        assert steward.post(f"/shards/{site.shard_id}/reject", data={"reason": "no csrf"}).status_code == 403
    assert SiteState(site.workdir).require(site.shard_id).state == "approved"


@pytest.mark.timeout(120)
def test_generated_token_is_printed_once_and_logs_in(tmp_path: Path, reid_src: Path) -> None:
    from test_export_gate import make_site

    site = make_site(tmp_path / "site", reid_src)
    port = free_port()
    err_path = tmp_path / "err"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "site_agent.cli", "ui", str(site.config_path), "--workdir",
                                 str(site.workdir), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            deadline, token = time.monotonic() + 60, None
            while token is None and time.monotonic() < deadline and proc.poll() is None:
                m = re.search(r"access token \(shown once[^:]*\): (\S+)", err_path.read_text())
                token = m.group(1) if m else None
                time.sleep(0.2)
            assert token and len(token) >= 32, err_path.read_text()[-2000:]
            for _ in range(100):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                form = c.get("/login").text
                csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
                r = c.post("/login", data={"csrf": csrf, "token": token})
                assert (r.status_code, r.headers["location"]) == (303, "/")
                assert c.get("/").status_code == 200
            proc.send_signal(signal.SIGTERM)  # how `docker stop` ends it: graceful, reported as terminated
            rc = proc.wait(timeout=30)
        finally:
            stop(proc)
    text = err_path.read_text()
    assert rc == 128 + signal.SIGTERM and "could not serve" not in text, text[-2000:]
    assert text.count(token) == 1, "the token is printed exactly once"
    assert f"http://127.0.0.1:{port}/login" in text
