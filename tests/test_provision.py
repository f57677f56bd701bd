"""Provisioning (CA, server cert, site identities), coordinator config loading and the coordinator CLI."""

from __future__ import annotations

import ipaddress
import json
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
        for name in ("site.key", "site.pub", "ca.pem", "site-connection.yaml", "README.txt"):
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
