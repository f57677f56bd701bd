"""`privdistill-site doctor` against a real TLS coordinator (in-process uvicorn on 127.0.0.1): every check,
its failure modes and the documented exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _fixtures import FMNIST
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.config import load_coordinator_config
from coordinator.ledger import Ledger
from coordinator.provision import provision
from coordinator.serve import build_server
from site_agent import doctor
from site_agent.cli import main as site_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    prov = provision(tmp_path_factory.mktemp("prov") / "p", ["hospital-a", "hospital-b"], days=20)
    port = _free_port()
    server = build_server(load_coordinator_config(prov.config), host="127.0.0.1", port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "coordinator did not start in 20 s"
        time.sleep(0.05)
    yield prov, port
    server.should_exit = True
    thread.join(timeout=15)


def _site_yaml(root: Path, kit: Path, port: int, **site: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    raw = {
        "name": "doctor", "seed": 0,
        "data": {"source": {"type": "idx", "images": str(FMNIST / "train-images-idx3-ubyte.gz"),
                            "labels": str(FMNIST / "train-labels-idx1-ubyte.gz")},
                 "classes": [1, 7], "max_per_class": 20},
        "teacher": {"model": {"block_out_channels": [16, 32], "norm_num_groups": 8}},
        "site": {"id": kit.name, "coordinator_url": f"https://127.0.0.1:{port}", "ca_file": str(kit / "ca.pem"),
                 "key_file": str(kit / "site.key"), **site},
    }
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _by_name(report: doctor.Report) -> dict[str, doctor.Check]:
    return {c.name: c for c in report.checks}


def test_a_healthy_install_passes_every_check(coordinator, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prov, port = coordinator
    cfg = _site_yaml(tmp_path, prov.site_dirs["hospital-a"], port)

    rc = site_main(["doctor", str(cfg), "--workdir", str(tmp_path / "work"), "--json"])

    out = json.loads(capsys.readouterr().out)
    status = {c["name"]: c["status"] for c in out["checks"]}
    assert rc == 0 and out["exit_code"] == 0, out
    assert status == {"config": "ok", "site_key": "ok", "flower_node_key": "ok", "ca_certificate": "warn",
                      "coordinator_tls": "warn", "coordinator_health": "ok", "site_registered": "ok",
                      "data_source": "ok", "workdir": "ok", "disk_space": "ok", "gpu": "ok"}
    tls = next(c for c in out["checks"] if c["name"] == "coordinator_tls")
    assert "expires in" in tls["message"] and 19 <= tls["details"]["days_left"] <= 20  # provisioned for 20 days: warned


def test_an_invalid_config_exits_2_and_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "site.yaml"
    site = {"id": "a", "coordinator_url": "http://x:1", "ca_file": "ca.pem", "key_file": "site.key"}
    cfg.write_text(yaml.safe_dump({"data": {"source": {"type": "idx", "images": "/nonexistent.gz"}},
                                   "teachr": {}, "site": site}))

    rc = site_main(["doctor", str(cfg), "--workdir", str(tmp_path / "w")])

    out = capsys.readouterr().out
    assert rc == doctor.EXIT_CONFIG == 2
    assert "[FAIL] config" in out
    for expected in ("teachr", "https://"):
        assert expected in out, (expected, out)


def test_a_revoked_site_and_a_foreign_key_fail_site_registered(coordinator, tmp_path: Path) -> None:
    prov, port = coordinator
    kit = prov.site_dirs["hospital-b"]
    report = doctor.run_doctor(_site_yaml(tmp_path / "b", kit, port), tmp_path / "w")
    assert _by_name(report)["site_registered"].status == "ok"

    # hospital-a's key presented as hospital-b: the coordinator knows another key for that name
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("ca.pem", "site.key"):
        src = (prov.site_dirs["hospital-a"] if name == "site.key" else kit) / name
        (foreign / name).write_bytes(src.read_bytes())
        os.chmod(foreign / name, 0o600)
    cfg = _site_yaml(tmp_path / "f", foreign, port)
    data = yaml.safe_load(cfg.read_text())
    data["site"]["id"] = "hospital-b"
    cfg.write_text(yaml.safe_dump(data))
    check = _by_name(doctor.run_doctor(cfg, tmp_path / "w"))["site_registered"]
    assert check.status == "fail" and "not the key provisioned" in check.message

    Ledger(load_coordinator_config(prov.config).ledger_path).revoke_site("hospital-b")
    report = doctor.run_doctor(_site_yaml(tmp_path / "b2", kit, port), tmp_path / "w")
    check = _by_name(report)["site_registered"]
    assert check.status == "fail" and "revoked_site" in check.message
    assert report.exit_code == doctor.EXIT_FAILED


def test_a_coordinator_signed_by_another_ca_is_not_trusted(coordinator, tmp_path: Path) -> None:
    prov, port = coordinator
    other = provision(tmp_path / "other", ["hospital-a"], days=20)  # same site name, different CA

    report = doctor.run_doctor(_site_yaml(tmp_path / "s", other.site_dirs["hospital-a"], port), tmp_path / "w")

    checks = _by_name(report)
    assert checks["coordinator_tls"].status == "fail" and "NOT trusted" in checks["coordinator_tls"].message
    assert checks["site_registered"].status == "skip"
    assert checks["data_source"].status == "ok" and checks["disk_space"].status == "ok"  # the rest still ran
    assert report.exit_code == 1


def test_unreachable_coordinator_and_a_loose_node_key(coordinator, tmp_path: Path) -> None:
    prov, _ = coordinator
    kit = tmp_path / "kit"
    kit.mkdir()
    for name in ("ca.pem", "site.key", "flower-node.key"):
        (kit / name).write_bytes((prov.site_dirs["hospital-a"] / name).read_bytes())
        os.chmod(kit / name, 0o600)
    os.chmod(kit / "flower-node.key", 0o644)
    cfg = _site_yaml(tmp_path / "s", kit, _free_port())  # nothing listens there

    report = doctor.run_doctor(cfg, tmp_path / "w", timeout_s=3)

    checks = _by_name(report)
    assert checks["coordinator_tls"].status == "fail" and "cannot reach" in checks["coordinator_tls"].message
    assert checks["flower_node_key"].status == "fail" and "chmod 600" in checks["flower_node_key"].message
    assert checks["site_key"].status == "ok" and checks["site_registered"].status == "skip"
    assert report.exit_code == 1


def test_a_data_source_that_went_away(tmp_path: Path) -> None:
    from privdistill.config import IdxSource

    src = IdxSource(type="idx", images=tmp_path / "unmounted" / "train-images.gz")

    check = doctor.check_data_source(src, 1.0)

    assert check.status == "fail" and "unmounted" in check.message and "mount the data" in check.message


def test_disk_space_fails_when_the_run_does_not_fit(coordinator, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    prov, port = coordinator
    cfg_path = _site_yaml(tmp_path, prov.site_dirs["hospital-a"], port)
    from site_agent.config import load_site_config

    need, parts = doctor.estimate_run_bytes(load_site_config(cfg_path))
    assert need == sum(parts.values()) and parts["teacher_model"] > 0 and parts["ingested_images"] > 0
    # 2 classes x 20 images x 28x28 float32, train + test copies
    assert parts["ingested_images"] == 2 * 20 * 28 * 28 * 4 * 2

    usage = type("U", (), {"free": need // 2, "total": need, "used": need // 2})
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda _p: usage)
    check = doctor.check_disk(tmp_path, load_site_config(cfg_path))
    assert check.status == "fail" and "free space first" in check.message


def _cert(not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    from cryptography.hazmat.primitives import hashes

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(not_before).not_valid_after(not_after).sign(key, hashes.SHA256()))


def test_certificate_dates() -> None:
    now = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    day = dt.timedelta(days=1)

    expired = doctor.cert_validity(_cert(now - 10 * day, now - day), now, "ca")
    soon = doctor.cert_validity(_cert(now - day, now + 5 * day), now, "ca")
    future = doctor.cert_validity(_cert(now + day, now + 90 * day), now, "ca")
    fine = doctor.cert_validity(_cert(now - day, now + 90 * day), now, "ca")

    assert expired is not None and expired.status == "fail" and "expired on" in expired.message
    assert soon is not None and soon.status == "warn" and soon.details["days_left"] == 5.0
    assert future is not None and future.status == "fail" and "clock" in future.message
    assert fine is None
