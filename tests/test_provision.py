"""Provisioning (CA, server cert, site identities), coordinator config loading and the coordinator CLI."""

from __future__ import annotations

import errno
import ipaddress
import json
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.cli import main
from coordinator.config import load_coordinator_config
from coordinator.ledger import Ledger
from coordinator.provision import provision
from privdistill.errors import ConfigError
from privdistill.identity import load_private_key, public_key_b64


@pytest.fixture(scope="module")
def prov(tmp_path_factory):
    return provision(tmp_path_factory.mktemp("p") / "out", ["hospital-a", "hospital-b"], host="coord.example",
                     port=9443, days=30)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_layout_and_private_key_modes(prov):
    root = prov.root
    for rel in ("ca/ca.pem", "ca/ca.key", "coordinator/server.pem", "coordinator/server.key",
                "coordinator/coordinator.yaml", "coordinator/state/ledger.sqlite"):
        assert (root / rel).is_file(), rel
    for site in ("hospital-a", "hospital-b"):
        for name in ("site.key", "site.pub", "ca.pem", "site-connection.yaml", "README.md"):
            assert (root / site / name).is_file()
        assert _mode(root / site / "site.key") == 0o600
    assert _mode(root / "ca" / "ca.key") == 0o600
    assert _mode(root / "coordinator" / "server.key") == 0o600
    assert not list(root.parent.glob(".out.*")), "temporary provisioning directory left behind"


def test_server_cert_chains_to_ca_with_sans(prov):
    ca = x509.load_pem_x509_certificate(prov.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(prov.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "coord.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert isinstance(srv.public_key(), ec.EllipticCurvePublicKey) and srv.public_key().curve.name == "secp256r1"
    days = (srv.not_valid_after_utc - srv.not_valid_before_utc).days
    assert 29 <= days <= 30


def test_sites_registered_and_bundles_hold_only_their_own_key(prov):
    cfg = load_coordinator_config(prov.config)
    assert cfg.listen.port == 9443 and cfg.listen.host == "0.0.0.0"
    assert cfg.tls.cert == prov.server_cert and cfg.state_dir == prov.root / "coordinator" / "state"
    sites = {s.name: s for s in Ledger(cfg.ledger_path).sites()}
    assert set(sites) == {"hospital-a", "hospital-b"}
    ca_key = (prov.root / "ca" / "ca.key").read_bytes()
    server_key = (prov.root / "coordinator" / "server.key").read_bytes()
    keys = {s: (prov.root / s / "site.key").read_bytes() for s in sites}
    for site, d in prov.site_dirs.items():
        key = load_private_key(d / "site.key")
        assert public_key_b64(key) == sites[site].public_key == (d / "site.pub").read_text().strip()
        conn = yaml.safe_load((d / "site-connection.yaml").read_text())
        assert conn == {"site_id": site, "coordinator_url": "https://coord.example:9443", "ca_file": "ca.pem",
                        "key_file": "site.key", "superlink": "coord.example:9092", "flower_node_key": "flower-node.key"}
        blob = b"".join(p.read_bytes() for p in d.iterdir())
        assert ca_key not in blob and server_key not in blob
        assert b"PRIVATE KEY" in (d / "site.key").read_bytes()
        assert all(b"PRIVATE KEY" not in p.read_bytes() for p in d.iterdir()
                   if p.name not in ("site.key", "flower-node.key"))
        for other, other_key in keys.items():
            if other != site:
                assert other_key not in blob
                assert sites[other].public_key.encode() not in blob
    coord_blob = b"".join(p.read_bytes() for p in (prov.root / "coordinator").iterdir() if p.is_file())
    assert ca_key not in coord_blob and all(k not in coord_blob for k in keys.values())


def test_flower_node_keys_are_ec_private_to_their_site_and_registered_beside_the_coordinator(prov):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    privates = {}
    for site, d in prov.site_dirs.items():
        assert _mode(d / "flower-node.key") == 0o600
        key = load_ssh_private_key((d / "flower-node.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        pub = load_ssh_public_key((prov.root / "coordinator" / "flower-nodes" / f"{site}.pub").read_bytes())
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert (d / "flower-node.pub").read_bytes() == (prov.root / "coordinator" / "flower-nodes" / f"{site}.pub").read_bytes()
        privates[site] = (d / "flower-node.key").read_bytes()
    everything_else = b"".join(p.read_bytes() for p in prov.root.rglob("*") if p.is_file() and p.name != "flower-node.key")
    assert all(k not in everything_else for k in privates.values())
    assert privates["hospital-a"] not in b"".join(p.read_bytes() for p in prov.site_dirs["hospital-b"].iterdir())


def test_provision_refuses_bad_input_listing_every_problem(tmp_path, prov):
    with pytest.raises(ConfigError) as err:
        provision(prov.root, ["ok", "Bad Name", "ca", "ok"], port=0, days=0)
    text = " ".join(err.value.problems)
    for needle in ("'Bad Name'", "'ca' is reserved", "twice", "--port 0", "--days 0", "not empty"):
        assert needle in text
    assert len(err.value.problems) == 6


def test_config_problems_all_listed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("listen: {port: 70000, hots: x}\ntls: {cert: a.pem}\nlimits: {max_chunk_bytes: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_coordinator_config(p)
    text = "\n".join(err.value.problems)
    for needle in ("listen.port", "listen.hots: unknown key", "tls.key", "state_dir", "limits.max_chunk_bytes"):
        assert needle in text
    assert len(err.value.problems) == 5


def test_cli_provision_sites_and_shards(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["provision", "--sites", "a,b", "--out", str(out), "--days", "5"]) == 0
    cfg = str(out / "coordinator" / "coordinator.yaml")
    capsys.readouterr()
    assert main(["sites", "list", "--config", cfg, "--json"]) == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)] == ["a", "b"]
    pub = (out / "a" / "site.pub").read_text().strip()
    assert main(["sites", "add", "c", pub, "--config", cfg]) == 0
    assert main(["sites", "revoke", "b", "--config", cfg]) == 0
    capsys.readouterr()
    assert main(["sites", "list", "--config", cfg, "--json"]) == 0
    rows = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"a", "b", "c"} and rows["b"]["revoked_at"] and rows["a"]["revoked_at"] is None
    audit = [json.loads(x) for x in (out / "coordinator" / "state" / "audit.log").read_text().splitlines()]
    assert [(e["event"], e["site"]) for e in audit] == [("site_added", "a"), ("site_added", "b"),
                                                        ("site_added", "c"), ("site_revoked", "b")]
    assert main(["shards", "list", "--config", cfg, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    # errors: exit code of the error class, the message on stderr
    assert main(["sites", "add", "a", pub, "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "error: 1 configuration problem(s):\n  - site 'a' is already registered" in err
    assert main(["sites", "revoke", "zz", "--config", cfg]) == 2
    assert main(["sites", "list", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["provision", "--sites", "a", "--out", str(out)]) == 2


def test_serve_refuses_missing_tls_files(tmp_path, capsys):
    prov = provision(tmp_path / "p", ["a"], days=1)
    (prov.root / "coordinator" / "server.key").unlink()
    assert main(["serve", "--config", str(prov.config), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: 1 configuration problem(s):" in err and "tls.key:" in err and "server.key does not exist" in err


# ----------------------------------------------------------------------------- kit README, key rotation, cert renewal
def _upload(client, key, site: str, shard_dir: Path) -> int:
    """Create and send one shard in a single chunk; the final status code (201 then 204, or the refusal)."""
    from privdistill.identity import sign_request

    manifest, sig = (shard_dir / "manifest.json").read_bytes(), (shard_dir / "manifest.sig").read_text()
    body = json.dumps({"manifest": manifest.decode(), "signature": sig}).encode()
    r = client.post("/v1/uploads", content=body,
                    headers=sign_request(key, site, "POST", "/v1/uploads", body, host="testserver"))
    if r.status_code != 201:
        return r.status_code
    tar = (shard_dir / "shard.tar").read_bytes()
    path = f"/v1/uploads/{r.json()['upload_id']}"
    h = sign_request(key, site, "PATCH", path, tar, host="testserver", upload_offset=0,
                     content_type="application/offset+octet-stream")
    return client.patch(path, content=tar, headers=h).status_code


def _shard(out: Path, site: str, shard_id: str, key) -> Path:
    import numpy as np

    from privdistill.data.types import ImageSet
    from privdistill.shard import write_shard

    rng = np.random.default_rng(len(shard_id))
    kept = ImageSet(images=rng.uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32), labels=np.array([0, 1, 0, 1]),
                    class_names=["cat", "dog"])
    write_shard(kept, out, site_id=site, shard_id=shard_id, config_hash="0" * 64, privacy={"kept": 4}, key=key)
    return out


def test_kit_readme_names_every_file_and_who_holds_the_keys(prov):
    from coordinator.provision import KIT_FILES

    for site, d in prov.site_dirs.items():
        assert sorted(p.name for p in d.iterdir()) == sorted(KIT_FILES)
        text = (d / "README.md").read_text()
        for name in KIT_FILES:
            assert f"`{name}`" in text, name
        for needle in (f"site `{site}`", "/run/secrets/site.key", "/run/secrets/flower-node.key", "chown -R 10001",
                       "deletes their copy", f"sites rotate {site}", "https://coord.example:9443"):
            assert needle in text, needle


def test_rotate_replaces_the_key_keeps_the_history_and_refuses_the_old_key(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from coordinator.api import create_app

    p = provision(tmp_path / "kit", ["hospital-a", "hospital-b"], host="coord.example", days=30)
    cfg = load_coordinator_config(p.config)
    old_key = load_private_key(p.site_dirs["hospital-a"] / "site.key")
    old_pub = (p.site_dirs["hospital-a"] / "site.pub").read_text().strip()
    node_pub_before = (p.root / "coordinator" / "flower-nodes" / "hospital-a.pub").read_bytes()
    with TestClient(create_app(cfg)) as client:
        assert _upload(client, old_key, "hospital-a", _shard(tmp_path / "s1", "hospital-a", "s1", old_key)) == 204
    assert main(["sites", "revoke", "hospital-a", "--config", str(p.config)]) == 0
    capsys.readouterr()

    # Execute
    assert main(["sites", "rotate", "hospital-a", "--config", str(p.config), "--out", str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out

    # Assert: a full kit with new keys, the ledger row replaced, shards and events kept under the same name
    new = tmp_path / "new"
    from coordinator.provision import KIT_FILES

    assert sorted(x.name for x in new.iterdir()) == sorted(KIT_FILES) and _mode(new / "site.key") == 0o600
    new_key = load_private_key(new / "site.key")
    new_pub = public_key_b64(new_key)
    assert new_pub != old_pub and (new / "site.pub").read_text().strip() == new_pub
    assert yaml.safe_load((new / "site-connection.yaml").read_text())["coordinator_url"] == "https://coord.example:8443"
    assert (new / "ca.pem").read_bytes() == p.ca_cert.read_bytes()
    assert "was revoked and is active again" in out
    assert "1 shard(s) of hospital-a stay excluded" in out and "shards include --site hospital-a" in out
    ledger = Ledger(cfg.ledger_path)
    row = ledger.site("hospital-a")
    assert row.public_key == new_pub and not row.revoked
    assert ledger.site("hospital-b").public_key == (p.site_dirs["hospital-b"] / "site.pub").read_text().strip()
    # the revocation excluded s1 from training; rotating the key does not let it back in by itself
    assert ledger.accepted_shards() == []
    assert [(s.shard_id, s.status, s.status_reason) for s in ledger.all_shards()] == [("s1", "excluded",
                                                                                        "site_revoked")]
    kinds = [(e.kind, e.site) for e in ledger.events() if e.site == "hospital-a"]
    assert kinds[0] == ("site_added", "hospital-a") and kinds[-3:] == [("site_revoked", "hospital-a"),
                                                                      ("shard_excluded", "hospital-a"),
                                                                      ("site_key_rotated", "hospital-a")]
    assert ledger.events("site_key_rotated")[0].reason.startswith("previous_key_sha256=")
    audit = [json.loads(x) for x in (cfg.state_dir / "audit.log").read_text().splitlines()]
    assert audit[-1]["event"] == "site_key_rotated" and audit[-1]["was_revoked"] is True
    node_pub_after = (p.root / "coordinator" / "flower-nodes" / "hospital-a.pub").read_bytes()
    assert node_pub_after != node_pub_before and node_pub_after == (new / "flower-node.pub").read_bytes()
    # the old key is refused from now on, the new one uploads
    with TestClient(create_app(cfg)) as client:
        assert _upload(client, old_key, "hospital-a", _shard(tmp_path / "s2", "hospital-a", "s2", old_key)) == 401
        assert _upload(client, new_key, "hospital-a", _shard(tmp_path / "s3", "hospital-a", "s3", new_key)) == 204
    assert sorted(s.shard_id for s in ledger.accepted_shards()) == ["s3"]
    assert main(["shards", "include", "--site", "hospital-a", "--config", str(p.config)]) == 0
    assert sorted(s.shard_id for s in ledger.accepted_shards()) == ["s1", "s3"]


def test_rotate_refuses_unknown_site_and_used_out_dir_and_tells_when_node_keys_are_read_only(tmp_path, capsys,
                                                                                          monkeypatch):
    from coordinator.provision import rotate_site

    p = provision(tmp_path / "kit", ["a"], days=5)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(ConfigError) as err:
        rotate_site(p.config, "zz", tmp_path / "used")
    text = " ".join(err.value.problems)
    assert "'zz' is not registered" in text and "not empty" in text and len(err.value.problems) == 2
    before = Ledger(load_coordinator_config(p.config).ledger_path).site("a").public_key
    assert main(["sites", "rotate", "zz", "--config", str(p.config), "--out", str(tmp_path / "n")]) == 2
    assert not (tmp_path / "n").exists()
    pubs = p.root / "coordinator" / "flower-nodes"
    real_copy = shutil.copyfile

    def read_only(src, dst, *a, **k):  # as in a compose install, where flower-nodes/ is mounted read-only
        if Path(dst).parent == pubs:
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", read_only)
    capsys.readouterr()
    assert main(["sites", "rotate", "a", "--config", str(p.config), "--out", str(tmp_path / "n2")]) == 0
    assert f"copy {tmp_path / 'n2'}/flower-node.pub to the coordinator's flower-nodes/a.pub" in capsys.readouterr().out
    assert Ledger(load_coordinator_config(p.config).ledger_path).site("a").public_key != before
    assert (pubs / "a.pub").read_bytes() != (tmp_path / "n2" / "flower-node.pub").read_bytes()


def test_renew_cert_reissues_from_the_same_ca_and_never_outlives_it(tmp_path, capsys):
    from coordinator.provision import renew_server_cert

    p = provision(tmp_path / "kit", ["a"], host="coord.example", days=30)
    old_pem, old_key = p.server_cert.read_bytes(), (p.root / "coordinator" / "server.key").read_bytes()
    assert main(["renew-cert", "--kit", str(p.root), "--days", "20"]) == 0
    assert "restart the coordinator" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    assert p.server_cert.read_bytes() != old_pem and (p.root / "coordinator" / "server.key").read_bytes() != old_key
    assert _mode(p.root / "coordinator" / "server.key") == 0o600
    assert 19 <= (srv.not_valid_after_utc - srv.not_valid_before_utc).days <= 20
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example" in san.get_values_for_type(x509.DNSName)
    # the served key matches the new certificate
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((p.root / "coordinator" / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()
    default = renew_server_cert(p.root)  # default validity: at most the CA's remaining days
    assert x509.load_pem_x509_certificate(default.read_bytes()).not_valid_after_utc <= ca.not_valid_after_utc
    with pytest.raises(ConfigError) as err:
        renew_server_cert(p.root, days=400)
    assert "--days 400: must be 1.." in err.value.problems[0]
    assert main(["renew-cert", "--kit", str(tmp_path / "nokit")]) == 2
    assert "ca.key: not found" in capsys.readouterr().err
    assert not list((p.root / "coordinator").glob("*.tmp")) and not list((p.root / "coordinator").glob("*.new"))
