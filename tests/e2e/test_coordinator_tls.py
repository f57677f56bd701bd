"""The real coordinator process over HTTPS: provision, serve on a free port, verify TLS with the provisioned CA,
refuse a client that does not trust that CA, upload one shard with signed requests, stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from coordinator.provision import provision
from privdistill.data.types import ImageSet
from privdistill.identity import load_private_key, sign_request
from privdistill.shard import write_shard

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
EXE = ROOT / ".venv" / "bin" / "privdistill-coordinator"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, ctx: ssl.SSLContext, proc: subprocess.Popen, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"coordinator exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            r = httpx.get(f"{url}/healthz", verify=ctx, timeout=2.0)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError as err:
            last = err
        time.sleep(0.2)
    raise AssertionError(f"coordinator not healthy after {timeout_s} s (last error: {last})")


def test_serve_over_tls(tmp_path):
    prov = provision(tmp_path / "prov", ["hospital-a"], days=2)
    port = _free_port()
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "coordinator.cli"]
    proc = subprocess.Popen([*cmd, "--log-format", "json", "serve", "--config", str(prov.config), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"https://127.0.0.1:{port}"
    try:
        ctx = ssl.create_default_context(cafile=str(prov.ca_cert))
        health = _wait_healthy(url, ctx, proc)
        assert health["status"] == "ok"

        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz", timeout=5.0)  # system trust store only: must not trust our private CA
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5.0)  # no plain HTTP: the server hangs up

        # one signed upload over the wire (the real uploader is site_agent/upload.py; this checks the server side)
        key = load_private_key(prov.site_dirs["hospital-a"] / "site.key")
        rng = np.random.default_rng(1)
        kept = ImageSet(images=rng.uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32), labels=np.array([0, 1, 0]),
                        class_names=["a", "b"])
        shard = tmp_path / "shard"
        write_shard(kept, shard, site_id="hospital-a", shard_id="e2e", config_hash="0" * 64, privacy={}, key=key)
        body = json.dumps({"manifest": (shard / "manifest.json").read_text(),
                           "signature": (shard / "manifest.sig").read_text()}).encode()
        with httpx.Client(base_url=url, verify=ctx, timeout=10.0) as client:
            r = client.post("/v1/uploads", content=body,
                            headers=sign_request(key, "hospital-a", "POST", "/v1/uploads", body,
                                                 host=urlsplit(url).netloc, content_type="application/json"))
            assert r.status_code == 201, r.text
            path = f"/v1/uploads/{r.json()['upload_id']}"
            tar = (shard / "shard.tar").read_bytes()
            r = client.patch(path, content=tar, headers=sign_request(
                key, "hospital-a", "PATCH", path, tar, host=urlsplit(url).netloc, upload_offset=0,
                content_type="application/offset+octet-stream"))
            assert r.status_code == 204 and r.headers["Upload-State"] == "accepted", r.text
            metrics = client.get("/metrics").text
            assert "privdistill_shards_accepted_total 1.0" in metrics
        listed = subprocess.run([*cmd, "shards", "list", "--json", "--config", str(prov.config)],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert [s["shard_id"] for s in json.loads(listed.stdout)] == ["e2e"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise
    err = proc.stderr.read()
    # uvicorn shuts down gracefully, then re-raises the signal it caught; the CLI's SIGTERM handler makes that an
    # orderly exit with status 128 + SIGTERM (a master of several workers returns 0), never "could not serve"
    assert rc in (0, 128 + signal.SIGTERM), err[-2000:]
    assert "could not serve" not in err
    assert "Finished server process" in err
