"""Provisioning: a private CA, the coordinator's TLS certificate and config, and one Ed25519 identity per site."""

from __future__ import annotations

import datetime as dt
import hashlib
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

from coordinator.audit_log import AuditLog
from coordinator.ledger import Ledger
from privdistill.errors import ConfigError
from privdistill.federated import DEFAULT_SUPERLINK_PORT, NODE_KEY_FILE, NODE_PUB_FILE, NODE_PUBS_DIR
from privdistill.identity import generate_key, public_key_b64, save_private_key, write_private_file
from privdistill.shard import ID_PATTERN

RESERVED = {"ca", "coordinator"}
# a site kit: what a site's install needs (deploy/compose/site.compose.yaml mounts the first four as secrets)
SITE_KEY_FILE, CA_FILE, CONNECTION_FILE, KIT_README = "site.key", "ca.pem", "site-connection.yaml", "README.md"
KIT_FILES = (SITE_KEY_FILE, NODE_KEY_FILE, CA_FILE, CONNECTION_FILE, "site.pub", NODE_PUB_FILE, KIT_README)


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
    now = dt.datetime.now(dt.UTC)
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
    now = dt.datetime.now(dt.UTC)
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
           "limits": {"max_chunk_bytes": 8 << 20, "max_shard_bytes": 2 << 30, "max_manifest_bytes": 1 << 20,
                      "max_clock_skew_s": 300}}
    (coord / "coordinator.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ledger = Ledger(coord / "state" / "ledger.sqlite")
    audit = AuditLog(coord / "state")
    url = f"https://{host}:{port}"
    for site in sites:
        pub = write_site_bundle(root / site, site, ca_pem=ca_pem, url=url, host=host, pubs_dir=coord / NODE_PUBS_DIR)
        ledger.add_site(site, pub)
        audit.event("site_added", site=site)


def write_site_bundle(d: Path, site: str, *, ca_pem: bytes, url: str, host: str, pubs_dir: Path) -> str:
    """One site's kit in the new directory ``d`` (fresh Ed25519 and Flower node keys); returns the public key."""
    d.mkdir(mode=0o700)
    key = generate_key()
    save_private_key(key, d / SITE_KEY_FILE)
    pub = public_key_b64(key)
    (d / "site.pub").write_text(pub + "\n")
    (d / CA_FILE).write_bytes(ca_pem)
    write_flower_node_key(d, pubs_dir, site)
    (d / CONNECTION_FILE).write_text(yaml.safe_dump(
        {"site_id": site, "coordinator_url": url, "ca_file": CA_FILE, "key_file": SITE_KEY_FILE,
         "superlink": f"{host}:{DEFAULT_SUPERLINK_PORT}", "flower_node_key": NODE_KEY_FILE}, sort_keys=False))
    (d / KIT_README).write_text(_SITE_README.format(site=site, url=url, host=host))
    return pub


@dataclass(frozen=True)
class Rotated:
    site: str
    kit: Path
    old_key_sha256: str
    was_revoked: bool
    node_pub: Path | None  # where the new Flower node public key was registered; None: copy it by hand


def _fingerprint(pub_b64: str) -> str:
    return hashlib.sha256(pub_b64.strip().encode()).hexdigest()


def _cert_host(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def rotate_site(config_path: Path, site: str, out: Path, *, host: str | None = None,
                port: int | None = None) -> Rotated:
    """New key pair and kit for a registered site; the ledger keeps the name, its shards and its history, and
    refuses the old key from now on (a revoked site is active again with the new key)."""
    from coordinator.config import load_coordinator_config

    cfg = load_coordinator_config(config_path)
    ledger = Ledger(cfg.ledger_path)
    row = ledger.site(site)
    out = Path(out).absolute()
    problems = []
    if row is None:
        problems.append(f"site {site!r} is not registered (see `sites list`); new sites: `sites add` or provision")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out {out} exists and is not empty; a kit is never written over (choose a new dir)")
    if cfg.tls.ca is None or not cfg.tls.ca.is_file():
        problems.append("tls.ca: the kit needs the CA certificate (ca.pem) and the coordinator config names none")
    if not cfg.tls.cert.is_file():
        problems.append(f"tls.cert: {cfg.tls.cert} does not exist (the coordinator's host name is read from it)")
    if problems:
        raise ConfigError(problems, str(config_path))
    assert row is not None and cfg.tls.ca is not None
    host = host or _cert_host(cfg.tls.cert)
    url = f"https://{host}:{port or cfg.listen.port}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    pubs = Path(tempfile.mkdtemp(prefix=".flower-nodes.", dir=out.parent))
    try:
        kit = tmp / "kit"
        pub = write_site_bundle(kit, site, ca_pem=cfg.tls.ca.read_bytes(), url=url, host=host, pubs_dir=pubs)
        if out.exists():
            out.rmdir()
        kit.rename(out)
        try:
            ledger.rotate_site_key(site, pub, reason=f"previous_key_sha256={_fingerprint(row.public_key)}")
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # a kit whose key the coordinator does not know is useless
            raise
        AuditLog(cfg.state_dir).event("site_key_rotated", site=site, old_key_sha256=_fingerprint(row.public_key),
                                      new_key_sha256=_fingerprint(pub), was_revoked=row.revoked)
        node_pub = _register_node_pub(pubs / f"{site}.pub", Path(config_path).resolve().parent / NODE_PUBS_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(pubs, ignore_errors=True)
    return Rotated(site=site, kit=out, old_key_sha256=_fingerprint(row.public_key), was_revoked=row.revoked,
                   node_pub=node_pub)


def _register_node_pub(new: Path, pubs_dir: Path) -> Path | None:
    """Replace the site's Flower node public key beside the coordinator config; None where that folder is
    read-only (a compose install mounts it so: the operator copies the kit's flower-node.pub there)."""
    target = pubs_dir / new.name
    try:
        pubs_dir.mkdir(mode=0o700, exist_ok=True)
        tmp = pubs_dir / f".{new.name}.tmp"
        shutil.copyfile(new, tmp)
        tmp.replace(target)
    except OSError:
        return None
    return target


def renew_server_cert(kit: Path, *, host: str | None = None, days: int | None = None) -> Path:
    """Re-issue the coordinator's TLS certificate and key from the kit's CA (sites need nothing new); the
    new certificate may not outlive the CA. Returns the new server.pem; restart the coordinator to use it."""
    kit = Path(kit)
    ca_key_path, ca_path = kit / "ca" / "ca.key", kit / "ca" / "ca.pem"
    coord = kit / "coordinator"
    problems = [f"{p}: not found (run this on the operator's provisioning folder, which holds the CA key)"
                for p in (ca_key_path, ca_path, coord / "server.pem") if not p.is_file()]
    if problems:
        raise ConfigError(problems)
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    left = (ca_cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    days = min(397, left) if days is None else days
    if left < 1:
        problems.append(f"the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}: provision a new kit "
                        "(every site needs the new ca.pem)")
    elif not 1 <= days <= left:
        problems.append(f"--days {days}: must be 1..{left} (the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d})")
    if problems:
        raise ConfigError(problems)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key, cert = make_server_cert(ca_key, ca_cert, host or _cert_host(coord / "server.pem"), days)
    write_private_file(coord / "server.key.new", _pem_key(key))
    (coord / ".server.pem.tmp").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (coord / "server.key.new").replace(coord / "server.key")
    (coord / ".server.pem.tmp").replace(coord / "server.pem")
    return coord / "server.pem"


_SITE_README = """# privdistill site kit for site `{site}`

Made by the coordinator operator with `privdistill-coordinator provision` (or `sites rotate`). Carry this
folder to site `{site}`'s agent machine on removable media or another channel you trust, and nowhere else.

| file | what it is | where it goes (docker compose install, `deploy/compose/site.compose.yaml`) |
|---|---|---|
| `site.key` | the site's Ed25519 **private** key: signs every shard and every upload request | secret `site_key` -> `/run/secrets/site.key` |
| `flower-node.key` | federated mode only: the site's Flower SuperNode **private** key (ECDSA P-256) | secret `flower_node_key` -> `/run/secrets/flower-node.key` |
| `ca.pem` | the coordinator's CA certificate: the agent trusts only servers it signed | secret `ca` -> `/run/secrets/ca.pem` |
| `site-connection.yaml` | site id `{site}`, coordinator URL {url}, SuperLink `{host}:9092`, file names above | secret `site_connection` -> `/run/secrets/site-connection.yaml` |
| `site.pub`, `flower-node.pub` | the public halves (the coordinator registered them); not mounted | keep for reference |
| `README.md` | this file | |

Set `SITE_KIT_DIR` in the compose `.env` to this folder. The container runs as uid 10001 and the keys
must stay mode 0600, so on the site's host:

    sudo chown -R 10001:10001 KIT_FOLDER && sudo chmod 600 KIT_FOLDER/site.key KIT_FOLDER/flower-node.key

Then write the site config (`SITE_CONFIG`, e.g. config/site.yaml beside the compose file site.yaml) from
this kit; the key and CA paths in it point at /run/secrets/:

    mkdir -p config && touch config/site.yaml
    docker compose -f site.compose.yaml run --rm -T site-agent sh -c \\
      'privdistill-site init /tmp/cfg --connection /run/secrets/site-connection.yaml >/dev/null && cat /tmp/cfg/site.yaml' > config/site.new
    mv config/site.new config/site.yaml

Without docker: `privdistill-site init DIR --connection site-connection.yaml`.

## Who holds what

- `site.key` and `flower-node.key` were generated on the coordinator operator's machine. The operator
  deletes their copy of this folder once the site has it; from then on only this site holds them.
  They never leave the site again: not in e-mail, tickets, backups kept off-site or container images.
- The coordinator keeps only the public keys (its ledger and `flower-nodes/{site}.pub`) and the CA key.
- The site never needs the CA key or any other site's files.

## If a key leaks, or to replace it routinely

Ask the coordinator operator to run

    privdistill-coordinator sites revoke {site} --config coordinator.yaml     # at once: refuse the old key
    privdistill-coordinator sites rotate {site} --config coordinator.yaml --out NEW_KIT

`rotate` makes a new kit like this one (new keys, same site name: the coordinator keeps every shard and
ledger record of `{site}`); the old key is refused from then on. Replace the three secrets with the new
kit's files and restart the site's services.
"""
