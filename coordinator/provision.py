"""Provisioning: a private CA, the coordinator's TLS certificate and config, and one Ed25519 identity per site."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privdistill.errors import ConfigError
from privdistill.federated import DEFAULT_SUPERLINK_PORT, NODE_KEY_FILE, NODE_PUB_FILE, NODE_PUBS_DIR
from privdistill.identity import generate_key, public_key_b64, save_private_key, write_private_file
from privdistill.shard import ID_PATTERN

from coordinator.audit import AuditLog
from coordinator.ledger import Ledger

RESERVED = {"ca", "coordinator"}


@dataclass(frozen=True)
class Provisioned:
    root: Path
    ca_cert: Path
    server_cert: Path
    config: Path
    site_dirs: dict[str, Path]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privdistill"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name("privdistill coordinator CA")).issuer_name(
        _name("privdistill coordinator CA")).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str,
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """ECDSA P-256 server certificate; SAN: IP 127.0.0.1, DNS localhost and ``host`` (IP or DNS name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    try:
        ip = x509.IPAddress(ipaddress.ip_address(host))
        if ip not in sans:
            sans.append(ip)
    except ValueError:
        if host != "localhost":
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder().subject_name(_name(host)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def write_flower_node_key(site_dir: Path, pubs_dir: Path, site: str) -> None:
    """The site's Flower SuperNode key pair (ECDSA P-256, OpenSSH format): private key only in the site's
    bundle (0600); the public key also beside the coordinator, for `flwr supernode register`."""
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_file(site_dir / NODE_KEY_FILE, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (site_dir / NODE_PUB_FILE).write_bytes(pub + b"\n")
    pubs_dir.mkdir(mode=0o700, exist_ok=True)
    (pubs_dir / f"{site}.pub").write_bytes(pub + b"\n")


def _check(sites: list[str], host: str, port: int, days: int, out: Path) -> None:
    problems = []
    if not sites:
        problems.append("--sites: give at least one site name (comma-separated)")
    for s in sites:
        if not re.fullmatch(ID_PATTERN, s):
            problems.append(f"site name {s!r} must match {ID_PATTERN}")
        elif s in RESERVED:
            problems.append(f"site name {s!r} is reserved (it names a provisioning folder)")
    if len(set(sites)) != len(sites):
        problems.append("--sites lists a name twice")
    if not host or any(c in host for c in "/: "):
        problems.append(f"--host {host!r} must be a host name or IP address")
    if not 1 <= port <= 65535:
        problems.append(f"--port {port} must be 1..65535")
    if not 1 <= days <= 3650:
        problems.append(f"--days {days} must be 1..3650")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out {out} exists and is not empty; provisioning never overwrites keys (choose a new dir)")
    if problems:
        raise ConfigError(problems)


def provision(out: Path, sites: list[str], *, host: str = "127.0.0.1", port: int = 8443,
              days: int = 397) -> Provisioned:
    """Write the whole layout into a temporary sibling directory, then rename it to ``out`` (all or nothing)."""
    out = Path(out).absolute()
    _check(sites, host, port, days, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(tmp, sites, host=host, port=port, days=days)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Provisioned(root=out, ca_cert=out / "ca" / "ca.pem", server_cert=out / "coordinator" / "server.pem",
                       config=out / "coordinator" / "coordinator.yaml", site_dirs={s: out / s for s in sites})


def _build(root: Path, sites: list[str], *, host: str, port: int, days: int) -> None:
    ca_key, ca_cert = make_ca(days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    (root / "ca").mkdir(mode=0o700)
    (root / "ca" / "ca.pem").write_bytes(ca_pem)
    write_private_file(root / "ca" / "ca.key", _pem_key(ca_key))

    coord = root / "coordinator"
    coord.mkdir(mode=0o700)
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, host, days)
    (coord / "server.pem").write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    write_private_file(coord / "server.key", _pem_key(srv_key))
    (coord / "ca.pem").write_bytes(ca_pem)
    listen = "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"
    cfg = {"listen": {"host": listen, "port": port},
           "tls": {"cert": "server.pem", "key": "server.key", "ca": "ca.pem"},
           "state_dir": "state",
           "limits": {"max_chunk_bytes": 8 << 20, "max_shard_bytes": 2 << 30, "max_manifest_bytes": 16 << 20,
                      "max_clock_skew_s": 300}}
    (coord / "coordinator.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ledger = Ledger(coord / "state" / "ledger.sqlite")
    audit = AuditLog(coord / "state")
    url = f"https://{host}:{port}"
    for site in sites:
        d = root / site
        d.mkdir(mode=0o700)
        key = generate_key()
        save_private_key(key, d / "site.key")
        pub = public_key_b64(key)
        (d / "site.pub").write_text(pub + "\n")
        (d / "ca.pem").write_bytes(ca_pem)
        write_flower_node_key(d, coord / NODE_PUBS_DIR, site)
        (d / "site-connection.yaml").write_text(yaml.safe_dump(
            {"site_id": site, "coordinator_url": url, "ca_file": "ca.pem", "key_file": "site.key",
             "superlink": f"{host}:{DEFAULT_SUPERLINK_PORT}", "flower_node_key": NODE_KEY_FILE}, sort_keys=False))
        (d / "README.txt").write_text(_SITE_README.format(site=site, url=url))
        ledger.add_site(site, pub)
        audit.event("site_added", site=site)


_SITE_README = """privdistill site bundle for site '{site}'

Copy this whole folder to the site's agent machine (and nowhere else):
  site.key              the site's Ed25519 private key (mode 0600; never share it)
  site.pub              its public key, registered with the coordinator
  ca.pem                the coordinator's CA: the agent trusts only certificates it signed
  site-connection.yaml  site_id, coordinator_url ({url}), ca_file and key_file for the uploader
  flower-node.key       federated mode only: this site's Flower SuperNode key (ECDSA P-256, mode 0600;
                        `privdistill-site join` uses it; the coordinator registered its flower-node.pub)

If the key leaks, ask the coordinator operator to run
  privdistill-coordinator sites revoke {site} --config coordinator/coordinator.yaml
"""
