"""The coordinator's compose stack on a real Docker engine: build, provision, `up`, /healthz over TLS, down."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "compose" / "coordinator.yaml"


def _engine() -> None:
    """Skip (never fail, even in CI) when no Docker engine answers."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as err:  # noqa: BLE001 - any failure means: no engine here
        pytest.skip(f"no Docker engine reachable ({type(err).__name__}: {str(err)[:120]}): compose stack not started")


def _compose() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return ["docker", "compose"]
    v1 = ROOT / ".venv-compose" / "bin" / "docker-compose"
    if v1.exists():
        return [str(v1)]
    pytest.skip("neither `docker compose` (v2) nor .venv-compose/bin/docker-compose (make compose-venv) is available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_root(image: str, folder: Path, *cmd: str) -> None:
    """Run ``cmd`` as root in the image with ``folder`` at /k (to hand files to uid 10001 and back)."""
    subprocess.run(["docker", "run", "--rm", "--user", "0", "--entrypoint", "", "-v", f"{folder}:/k", image, *cmd],
                   check=True, capture_output=True, timeout=120)


def test_coordinator_stack_serves_healthz_over_tls(tmp_path: Path) -> None:
    import httpx

    from coordinator.provision import provision

    _engine()
    compose = _compose()

    # Prepare: the image (or a prebuilt one), a kit, the .env
    image = os.environ.get("PRIVDISTILL_TEST_IMAGE")
    if image is None:
        image = f"privdistill:e2e-{uuid.uuid4().hex[:8]}"
        subprocess.run(["docker", "build", "-f", "deploy/docker/Dockerfile", "-t", image, "."], cwd=ROOT, check=True,
                       timeout=3600)
    repo, tag = image.rsplit(":", 1)
    kit = provision(tmp_path / "kit", ["hospital-a"], host="coord.test", days=2)
    coord_dir = kit.root / "coordinator"
    token = tmp_path / "secrets" / "admin_token"
    token.parent.mkdir()
    token.write_text("t" * 48 + "\n")
    token.chmod(0o600)
    for d in (tmp_path / "training", tmp_path / "reference-data"):
        d.mkdir()
    port = _free_port()
    env = tmp_path / "env"
    env.write_text(f"PRIVDISTILL_IMAGE={repo}\nPRIVDISTILL_VERSION={tag}\nCOORDINATOR_DIR={coord_dir}\n"
                   f"COORDINATOR_HOST=coord.test\nADMIN_TOKEN_FILE={token}\nCOORDINATOR_BIND=127.0.0.1\n"
                   f"COORDINATOR_PORT={port}\nTRAINING_DIR={tmp_path / 'training'}\n"
                   f"REFERENCE_DATA_DIR={tmp_path / 'reference-data'}\n")
    project = f"pdtest{uuid.uuid4().hex[:8]}"
    base = [*compose, "-f", str(COMPOSE_FILE), "--env-file", str(env), "-p", project]
    _as_root(image, coord_dir, "chown", "-R", "10001:10001", "/k")
    _as_root(image, token.parent, "chown", "-R", "10001:10001", "/k")
    try:
        # Execute
        subprocess.run([*base, "up", "-d", "coordinator"], check=True, timeout=600, capture_output=True)
        deadline, last = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            try:
                last = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=str(kit.ca_cert), timeout=5)
                break
            except httpx.HTTPError as err:
                last = err
                time.sleep(2)

        # Assert
        assert isinstance(last, httpx.Response), f"coordinator never answered: {last}"
        assert last.status_code == 200 and last.json()["status"] == "ok"
        sites = subprocess.run([*base, "run", "--rm", "-T", "coordinator", "privdistill-coordinator", "sites", "list",
                                "--config", "/etc/privdistill/coordinator.yaml", "--json"],
                               capture_output=True, text=True, timeout=300)
        assert sites.returncode == 0, sites.stderr
        assert '"hospital-a"' in sites.stdout  # the ledger seeded from the kit
        deadline = time.monotonic() + 120
        health = ""
        while time.monotonic() < deadline and health != "healthy":
            cid = subprocess.run([*base, "ps", "-q", "coordinator"], capture_output=True, text=True).stdout.strip()
            health = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid],
                                    capture_output=True, text=True).stdout.strip()
            time.sleep(3)
        assert health == "healthy"
    finally:
        subprocess.run([*base, "down", "-v", "--remove-orphans"], capture_output=True, timeout=300)
        uid_gid = f"{os.getuid()}:{os.getgid()}"
        for folder in (coord_dir, token.parent):
            _as_root(image, folder, "chown", "-R", uid_gid, "/k")
        if not os.environ.get("PRIVDISTILL_TEST_IMAGE"):
            subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, timeout=120)
        shutil.rmtree(tmp_path / "kit", ignore_errors=True)
