"""`privdistill-coordinator serve` as a real HTTPS process with the admin page on, driven in headless chromium: log in
with the admin token and see the sites, accepted and rejected shards, the student's loss curve, the released
student's sample grid and the release gate's verdict."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_ui import ADMIN_TOKEN, build_coordinator

from ._browser import WAIT_MS, browser, free_port, screenshot, server

pytestmark = pytest.mark.e2e


@pytest.fixture
def coordinator(tmp_path: Path, one_thread: None) -> Any:
    from coordinator.provision import provision

    prov = provision(tmp_path / "prov", ["site-a"], days=2)
    tls = yaml.safe_load(prov.config.read_text())["tls"]
    tls = {k: str((prov.config.parent / v).resolve()) for k, v in tls.items() if v}
    built = build_coordinator(tmp_path / "coord")
    raw = yaml.safe_load(built["config"].read_text())
    built["config"].write_text(yaml.safe_dump({**raw, "tls": tls}))
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(prov.ca_cert))
    args = ["coordinator.cli", "serve", "--config", str(built["config"]), "--port", str(port)]
    with server(args, f"{base}/healthz", tmp_path, verify=ctx):
        yield built, base, ctx


@pytest.mark.timeout(300)
def test_admin_sees_sites_shards_loss_curve_samples_and_gate(coordinator: Any, tmp_path: Path) -> None:
    built, base, ctx = coordinator
    training = json.loads((built["work"] / "train-student" / "training.json").read_text())
    with httpx.Client(base_url=base, verify=ctx, timeout=10) as c:
        assert c.get("/admin/").status_code == 303
        assert c.post("/admin/logout", data={"csrf": "x"}).status_code == 401
        assert "/admin" not in json.dumps(c.get("/openapi.json").json()["paths"])

    with browser() as b:
        context = b.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"{base}/admin/")
        assert page.url == f"{base}/admin/login"
        page.fill("input[name=token]", ADMIN_TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/admin/")

        assert page.locator("#sites tr[data-site]").count() == 2
        assert page.locator("#accepted tbody tr").count() == 2
        rejected = page.locator("#rejected tbody tr")
        assert rejected.count() == 1 and "hash_mismatch" in rejected.inner_text()
        assert page.locator("#loss svg circle.point").count() == len(training["train"]["loss_curve"])
        assert page.locator("#samples").evaluate("e => e.complete && e.naturalWidth > 0")
        assert page.inner_text("#gate") == "passes"
        assert "tiny-student v1" in page.inner_text("#release")
        screenshot(page, tmp_path, "coordinator-admin.png")
        cookies = {c["name"]: c["value"] for c in context.cookies()}
        context.close()

    with httpx.Client(base_url=base, verify=ctx, timeout=10, cookies=cookies) as admin:
        assert admin.get("/admin/").status_code == 200
        assert admin.post("/admin/logout", data={}).status_code == 403  # a session, but no CSRF token
