"""Per-site quotas and the upload lifecycle (in-process): open uploads and declared bytes per site, manifest size,
abandoned uploads expiring, rejected manifests pruned, and the operator's shard quarantine / remove / include
(a revoked site's shards stay out of training until included again)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from test_coordinator_api import CHUNK, A, B, count_rows, make_app, send_all, shard_files, start

from coordinator.store import shard_dir, staging_path
from privdistill.data.types import ImageSet
from privdistill.identity import generate_key, public_key_b64, sign
from privdistill.shard import write_shard


@pytest.fixture(scope="module")
def keys():
    return {A: generate_key(), B: generate_key(), "other": generate_key()}


def make_shard(root: Path, key, shard_id: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    kept = ImageSet(images=rng.uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32), labels=np.array([0, 1, 0, 1]),
                    class_names=["cat", "dog"])
    write_shard(kept, root / shard_id, site_id=A, shard_id=shard_id, config_hash="0" * 64, privacy={"kept": 4},
                key=key)
    return root / shard_id


def app_with(tmp_path: Path, keys, **limits):
    app = make_app(tmp_path, **limits)
    for site in (A, B):
        app.state.ledger.add_site(site, public_key_b64(keys[site]))
    return app


def audit_events(app) -> list[dict]:
    return [json.loads(x) for x in (app.state.config.state_dir / "audit.log").read_text().splitlines()]


def age(app, upload_id: str, days: float) -> None:
    """Move an upload's last update ``days`` into the past (as if the coordinator had been up that long)."""
    from datetime import datetime, timedelta

    when = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="milliseconds")
    with sqlite3.connect(app.state.config.ledger_path) as db:
        db.execute("UPDATE uploads SET updated_at = ? WHERE id = ?", (when, upload_id))


# ----------------------------------------------------------------------------- quotas
def test_open_uploads_per_site_are_capped(tmp_path, keys):
    app = app_with(tmp_path, keys, max_open_uploads_per_site=2)
    shards = [shard_files(make_shard(tmp_path / "made", keys[A], f"q{i}", seed=i)) for i in range(3)]
    with TestClient(app) as client:
        codes = [start(client, keys[A], A, m, s).status_code for _, m, s in shards]
        third = start(client, keys[A], A, shards[2][1], shards[2][2])
        assert codes == [201, 201, 429]
        assert third.json()["error"] == "too_many_open_uploads" and third.headers["Retry-After"]
        assert count_rows(app, "uploads") == 2
        # finishing one frees a slot; another site has its own quota
        up = start(client, keys[A], A, shards[0][1], shards[0][2]).json()
        send_all(client, keys[A], A, up["upload_id"], shards[0][0])
        assert start(client, keys[A], A, shards[2][1], shards[2][2]).status_code == 201


def test_declared_bytes_of_open_uploads_are_capped(tmp_path, keys):
    made = [shard_files(make_shard(tmp_path / "made", keys[A], f"b{i}", seed=10 + i)) for i in range(2)]
    app = app_with(tmp_path, keys, max_open_bytes_per_site=len(made[0][0]) + len(made[1][0]) - 1)
    with TestClient(app) as client:
        assert start(client, keys[A], A, made[0][1], made[0][2]).status_code == 201
        r = start(client, keys[A], A, made[1][1], made[1][2])
    assert (r.status_code, r.json()["error"]) == (429, "open_bytes_quota")
    assert count_rows(app, "uploads") == 1


def test_a_manifest_over_the_limit_is_refused_and_the_default_is_one_mib(tmp_path, keys):
    from coordinator.config import LimitsConfig

    assert LimitsConfig().max_manifest_bytes == 1 << 20
    app = app_with(tmp_path, keys, max_manifest_bytes=4096)
    shard = make_shard(tmp_path / "made", keys[A], "big", seed=3)
    data = json.loads((shard / "manifest.json").read_text())
    data["privacy"]["padding"] = "x" * 5000
    padded = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    with TestClient(app) as client:
        r = start(client, keys[A], A, padded, sign(keys[A], padded))
    assert (r.status_code, r.json()["error"]) == (413, "request_too_large")
    assert count_rows(app, "uploads") == 0


# ----------------------------------------------------------------------------- lifecycle
def test_abandoned_uploads_expire_and_their_staging_files_go(tmp_path, keys):
    app = app_with(tmp_path, keys, upload_expiry_s=3600)
    tar, manifest, sig = shard_files(make_shard(tmp_path / "made", keys[A], "ab", seed=4))
    with TestClient(app) as client:
        up = start(client, keys[A], A, manifest, sig).json()
        send_all(client, keys[A], A, up["upload_id"], tar[:CHUNK])
        part = staging_path(app.state.config.state_dir, up["upload_id"])
        assert part.stat().st_size == CHUNK
        assert app.state.uploads.housekeeping(force=True) == {"expired": 0, "pruned": 0}  # 0 s idle: kept
        age(app, up["upload_id"], days=2 / 24)
        assert app.state.uploads.housekeeping(force=True)["expired"] == 1
        row = app.state.ledger.upload(up["upload_id"])
        assert (row.state, row.reason) == ("rejected", "expired") and not part.exists()
        assert audit_events(app)[-1]["event"] == "upload_expired"
        # the site starts over with a fresh upload
        again = start(client, keys[A], A, manifest, sig)
        assert again.status_code == 201 and again.json()["upload_id"] != up["upload_id"]


def test_rejected_manifests_are_pruned_after_the_retention_period(tmp_path, keys):
    app = app_with(tmp_path, keys, rejected_retention_days=30)
    tar, manifest, sig = shard_files(make_shard(tmp_path / "made", keys[A], "rj", seed=5))
    with TestClient(app) as client:
        up = start(client, keys[A], A, manifest, sig).json()
        bad = bytearray(tar)
        bad[700] ^= 0xFF
        last = send_all(client, keys[A], A, up["upload_id"], bytes(bad))
    assert last.headers["Upload-State"] == "rejected"
    assert app.state.ledger.upload(up["upload_id"]).manifest == manifest.decode()
    age(app, up["upload_id"], days=29)
    assert app.state.uploads.housekeeping(force=True)["pruned"] == 0
    age(app, up["upload_id"], days=31)
    assert app.state.uploads.housekeeping(force=True)["pruned"] == 1
    row = app.state.ledger.upload(up["upload_id"])
    assert (row.manifest, row.signature, row.state, row.reason) == ("", "", "rejected", row.reason) and row.reason
    assert audit_events(app)[-1]["event"] == "rejected_pruned"


# ----------------------------------------------------------------------------- operator: quarantine, remove, include
@pytest.fixture()
def accepted(tmp_path, keys):
    """An app with one accepted shard of site-a, and a coordinator.yaml over its state for the CLI."""
    app = app_with(tmp_path, keys)
    tar, manifest, sig = shard_files(make_shard(tmp_path / "made", keys[A], "ok", seed=6))
    with TestClient(app) as client:
        up = start(client, keys[A], A, manifest, sig).json()
        assert send_all(client, keys[A], A, up["upload_id"], tar).headers["Upload-State"] == "accepted"
    cfg = tmp_path / "coordinator.yaml"
    cfg.write_text(yaml.safe_dump({"tls": {"cert": "x.pem", "key": "x.key"}, "state_dir": str(tmp_path / "state")}))
    return app, cfg, app.state.ledger.accepted_shards()[0], (tar, manifest, sig)


def test_quarantine_and_include_move_a_shard_out_of_and_back_into_training(accepted, capsys):
    from coordinator.cli import main

    app, cfg, shard, _ = accepted
    assert main(["shards", "quarantine", shard.tar_sha256[:12], "--reason", "odd images", "--config", str(cfg)]) == 0
    assert app.state.ledger.accepted_shards() == []
    assert shard_dir(app.state.config.state_dir, shard.tar_sha256).is_dir()  # files kept
    ev = audit_events(app)[-1]
    assert (ev["event"], ev["reason"], ev["shard_sha256"], ev["previous"]) == ("shard_quarantined", "odd images",
                                                                                shard.tar_sha256, "active")
    assert main(["shards", "include", "ok", "--config", str(cfg)]) == 0
    assert [s.tar_sha256 for s in app.state.ledger.accepted_shards()] == [shard.tar_sha256]
    assert audit_events(app)[-1]["event"] == "shard_included"
    assert [e.kind for e in app.state.ledger.events()][-2:] == ["shard_quarantined", "shard_included"]
    with pytest.raises(SystemExit):  # --reason is required
        main(["shards", "quarantine", "ok", "--config", str(cfg)])
    assert main(["shards", "quarantine", "nosuch", "--reason", "x", "--config", str(cfg)]) == 2


def test_remove_deletes_the_files_and_a_reupload_is_refused(accepted, keys):
    from coordinator.cli import main

    app, cfg, shard, (tar, manifest, sig) = accepted
    assert main(["shards", "remove", shard.tar_sha256, "--reason", "operator decision", "--config", str(cfg)]) == 0
    assert not shard_dir(app.state.config.state_dir, shard.tar_sha256).exists()
    assert app.state.ledger.accepted_shards() == [] and app.state.ledger.shard(shard.tar_sha256).status == "removed"
    assert audit_events(app)[-1]["event"] == "shard_removed"
    assert main(["shards", "include", shard.tar_sha256, "--config", str(cfg)]) == 2  # removed is final
    with TestClient(app) as client:
        r = start(client, keys[A], A, manifest, sig)
    assert (r.status_code, r.json()["error"]) == (409, "shard_removed")


def test_revoking_a_site_excludes_its_shards_until_included(accepted, capsys):
    from coordinator.cli import main

    app, cfg, shard, _ = accepted
    assert main(["sites", "revoke", A, "--config", str(cfg)]) == 0
    assert "1 shard(s) excluded" in capsys.readouterr().out
    assert app.state.ledger.accepted_shards() == []
    assert app.state.ledger.shard(shard.tar_sha256).status_reason == "site_revoked"
    assert main(["shards", "list", "--all", "--config", str(cfg)]) == 0
    assert "excluded (site_revoked)" in capsys.readouterr().out
    assert main(["shards", "include", "--site", A, "--config", str(cfg)]) == 0
    assert [s.tar_sha256 for s in app.state.ledger.accepted_shards()] == [shard.tar_sha256]


def test_revoking_a_site_closes_its_open_uploads(tmp_path, keys):
    app = app_with(tmp_path, keys)
    tar, manifest, sig = shard_files(make_shard(tmp_path / "made", keys[A], "op", seed=7))
    with TestClient(app) as client:
        up = start(client, keys[A], A, manifest, sig).json()
        send_all(client, keys[A], A, up["upload_id"], tar[:CHUNK])
    _, excluded, closed = app.state.ledger.revoke_site(A)
    assert (excluded, closed) == (0, 1)
    assert app.state.ledger.upload(up["upload_id"]).reason == "site_revoked"
    app.state.uploads.housekeeping(force=True)
    assert not staging_path(app.state.config.state_dir, up["upload_id"]).exists()
