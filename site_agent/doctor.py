"""`privdistill-site doctor`: a preflight that checks a site install before its first run, each check on its own."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import structlog
from cryptography import x509

from privdistill.errors import ConfigError, PrivdistillError
from privdistill.identity import loose_mode

log = structlog.get_logger(__name__)

Status = Literal["ok", "warn", "fail", "skip"]
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
CERT_WARN_DAYS = 30
CLOCK_WARN_S = 20.0  # requests fail beyond 30 s ahead (300 s behind)
DISK_MARGIN = 2.0  # free space asked for, as a multiple of the run's estimated footprint
NODE_KEY_FILE = "flower-node.key"


@dataclass
class Check:
    name: str
    status: Status
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    checks: list[Check]

    @property
    def exit_code(self) -> int:
        if any(c.name == "config" and c.status == "fail" for c in self.checks):
            return EXIT_CONFIG
        return EXIT_FAILED if any(c.status == "fail" for c in self.checks) else EXIT_OK

    def public(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "checks": [asdict(c) for c in self.checks]}


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """One check's unexpected error becomes its own failure; the other checks still run."""
    try:
        return fn()
    except PrivdistillError as err:
        return Check(name, "fail", str(err))
    except Exception as err:
        log.debug("doctor.check_crashed", check=name, error=repr(err))
        return Check(name, "fail", f"{type(err).__name__}: {err}")


# ----------------------------------------------------------------------------- keys and certificates
def check_private_file(name: str, path: Path, loader: Callable[[Path], Any], *, optional: bool = False) -> Check:
    """A private key exists, parses, and no one but its owner can read it."""
    if not path.is_file():
        if optional:
            return Check(name, "skip", f"{path.name} not present (only federated mode needs it)")
        return Check(name, "fail", f"{path} not found: copy it from the site's provisioning kit")
    if (mode := loose_mode(path)) is not None:
        return Check(name, "fail", f"{path} has mode {mode:o}; run `chmod 600 {path}` (a private key must be "
                     "readable by its owner only)")
    mode = stat.S_IMODE(path.stat().st_mode)
    try:
        loader(path)
    except ConfigError as err:
        return Check(name, "fail", "; ".join(err.problems))
    except (ValueError, TypeError) as err:
        return Check(name, "fail", f"{path} is not a usable private key ({err}); copy it again from the kit")
    return Check(name, "ok", f"{path.name} readable by its owner only (mode {mode:o})")


def _load_ec_key(path: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    key = load_ssh_private_key(path.read_bytes(), password=None)  # provision writes it in OpenSSH format
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("Flower node keys must be EC (P-256) keys")
    return key


def cert_validity(cert: x509.Certificate, now: dt.datetime, what: str) -> Check | None:
    """A failure or warning about a certificate's dates, or None when it is valid for long enough."""
    left = (cert.not_valid_after_utc - now).total_seconds() / 86400
    if cert.not_valid_before_utc > now:
        return Check(what, "fail", f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this "
                     "machine's clock", {"days_left": round(left, 1)})
    if left <= 0:
        return Check(what, "fail", f"expired on {cert.not_valid_after_utc:%Y-%m-%d}: ask the coordinator operator "
                     "for a renewed certificate (deploy/README.md, rotation)", {"days_left": round(left, 1)})
    if left < CERT_WARN_DAYS:
        return Check(what, "warn", f"expires in {left:.0f} days ({cert.not_valid_after_utc:%Y-%m-%d}): plan its "
                     "renewal", {"days_left": round(left, 1)})
    return None


def check_ca(ca_file: Path, now: dt.datetime) -> Check:
    if not ca_file.is_file():
        return Check("ca_certificate", "fail", f"{ca_file} not found: copy ca.pem from the provisioning kit")
    try:
        cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    except ValueError as err:
        return Check("ca_certificate", "fail", f"{ca_file} is not a PEM certificate ({err})")
    bad = cert_validity(cert, now, "ca_certificate")
    if bad is not None:
        return bad
    left = (cert.not_valid_after_utc - now).days
    return Check("ca_certificate", "ok", f"valid until {cert.not_valid_after_utc:%Y-%m-%d} ({left} days)",
                 {"days_left": left, "subject": cert.subject.rfc4514_string()})


# ----------------------------------------------------------------------------- the coordinator
def check_coordinator_tls(url: str, ca_file: Path, now: dt.datetime, timeout_s: float) -> Check:
    """TCP reachable, the TLS certificate verifies against the site's CA for the configured host name."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as err:
        return Check("coordinator_tls", "fail", f"cannot use {ca_file} as the trust anchor ({err})")
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            version = tls.version()
    except ssl.SSLCertVerificationError as err:
        return Check("coordinator_tls", "fail", f"{host}:{port} answered, but its certificate is NOT trusted by "
                     f"{ca_file.name} ({err.verify_message}); check coordinator_url and ca_file from the kit")
    except (OSError, ssl.SSLError) as err:
        return Check("coordinator_tls", "fail", f"cannot reach {host}:{port} ({type(err).__name__}: {err}); check "
                     "the network path / firewall to the coordinator, then run doctor again")
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    bad = cert_validity(cert, now, "coordinator_tls")
    if bad is not None:
        return bad
    left = (cert.not_valid_after_utc - now).days
    return Check("coordinator_tls", "ok", f"{host}:{port} trusted ({version}), certificate valid {left} more days",
                 {"days_left": left, "tls_version": version})


def check_coordinator_api(url: str, ca_file: Path, site_id: str, key: Any, timeout_s: float) -> list[Check]:
    """/healthz answers; a signed request is accepted (the site is registered, its key and clock are right)."""
    from privdistill.identity import sign_request
    from site_agent.upload import error_code

    base = url.rstrip("/")
    prefix = urlsplit(base).path
    probe = f"{prefix}/v1/uploads/{'0' * 32}"
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)), timeout=timeout_s,
                          trust_env=True, follow_redirects=False) as client:
            health = client.get(f"{base}/healthz")
            req = client.build_request("GET", base + probe[len(prefix):])
            req.headers.update(sign_request(key, site_id, "GET", probe, b"", host=req.headers["Host"]))
            signed = client.send(req)
    except httpx.HTTPError as err:
        fail = Check("coordinator_health", "fail", f"request to {base} failed ({type(err).__name__}: {err})")
        return [fail, Check("site_registered", "skip", "coordinator not reachable")]
    checks = [Check("coordinator_health", "ok", f"{base}/healthz answered 200")
              if health.status_code == 200 else
              Check("coordinator_health", "fail", f"{base}/healthz answered HTTP {health.status_code}; is "
                    "coordinator_url the privdistill coordinator?")]
    code = error_code(signed)
    if signed.status_code == 404 and code == "unknown_upload":
        checks.append(Check("site_registered", "ok", f"the coordinator accepts requests signed by site {site_id!r}"))
    elif code in ("unknown_site", "revoked_site"):
        checks.append(Check("site_registered", "fail", f"the coordinator refused site {site_id!r} ({code}): ask its "
                            "operator to register (or re-provision) this site"))
    elif code in ("expired_timestamp", "bad_timestamp"):
        checks.append(Check("site_registered", "fail", f"the coordinator refused the request time ({code}): this "
                            "machine's clock is behind by more than 5 minutes or ahead by more than 30 s; fix NTP"))
    elif code == "bad_signature":
        checks.append(Check("site_registered", "fail", f"the coordinator does not know this key for {site_id!r} (or "
                            "the site is not registered): site.key_file is not the key provisioned for this site "
                            "(rotated?), or ask the operator to run `sites add`"))
    else:
        checks.append(Check("site_registered", "fail", f"unexpected answer HTTP {signed.status_code} {code}"))
    skew = _clock_skew(health)
    if skew is not None and abs(skew) > CLOCK_WARN_S:
        checks.append(Check("clock", "warn", f"this machine's clock differs from the coordinator's by {skew:+.0f} s "
                            "(requests fail beyond 300 s behind or 30 s ahead); check NTP", {"skew_s": round(skew, 1)}))
    return checks


def _clock_skew(resp: httpx.Response) -> float | None:
    import email.utils

    value = resp.headers.get("date")
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- data, disk, hardware
def check_data_source(src: Any, timeout_s: float) -> Check:
    """The configured source is there (files) or answers (PACS); its images are not read here."""
    kind = src.type
    if kind == "pacs":
        from privdistill.data.pacs import probe

        info = probe(src)
        details = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
        if not info.get("matching_instances"):
            return Check("data_source", "fail", f"PACS {src.url} answered, but no instance matches data.source.query "
                         f"(keys {sorted(src.query)}); check the query values", details)
        return Check("data_source", "ok", f"PACS {src.url} answered ({info.get('server', 'server')}); "
                     f"{info['matching_instances']}{'+' if info.get('matching_capped') else ''} matching instances",
                     details)
    paths = {"idx": [src.images] + ([src.labels] if getattr(src, "labels", None) else []),
             "npz": [getattr(src, "path", None)],
             "folder": [getattr(src, "root", None)], "dicom": [getattr(src, "root", None)]}[kind]
    missing = [str(p) for p in paths if p is None or not Path(p).exists()]
    if missing:
        return Check("data_source", "fail", f"{kind} source: not found: {', '.join(missing)} (mount the data "
                     "read-only where the config says)")
    unreadable = [str(p) for p in paths if not os.access(p, os.R_OK)]
    if unreadable:
        return Check("data_source", "fail", f"{kind} source: not readable by this user: {', '.join(unreadable)}")
    return Check("data_source", "ok", f"{kind} source present and readable")


def estimate_run_bytes(cfg: Any) -> tuple[int, dict[str, int]]:
    """A rough upper estimate of what a run writes into its work directory, by part."""
    import torch

    from privdistill.models import build_unet

    d = cfg.data
    n_classes = len(d.classes) if d.classes else 10
    pixels = d.resolution * d.resolution * d.channels
    parts: dict[str, int] = {}
    for name, diff in (("teacher", cfg.teacher), ("student", cfg.student_config)):
        with torch.device("meta"):
            unet = build_unet(diff.model, resolution=d.resolution, channels=d.channels, num_classes=n_classes)
        params = sum(p.numel() for p in unet.parameters())
        # weights + EMA + 2 Adam moments, in the model dir and in the checkpoint written beside it
        parts[f"{name}_model"] = params * 4 * 4 * 2
    per_class = d.max_per_class or 6000
    visits = d.visits.count if d.visits else 1
    parts["ingested_images"] = n_classes * per_class * visits * pixels * 4 * 2  # float32 train + test split
    n_syn = n_classes * cfg.sample.per_class
    parts["synthetic_images"] = n_syn * pixels * 4 * 3  # samples, kept set, shard PNGs + review grids
    return sum(parts.values()), parts


def check_disk(workdir: Path, cfg: Any) -> Check:
    base = workdir if workdir.exists() else next((p for p in workdir.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(base).free
    need, parts = estimate_run_bytes(cfg)
    details = {"free_bytes": free, "estimated_bytes": need, "parts": parts}
    msg = f"{free / 2**30:.1f} GiB free at {base}; a run needs about {need / 2**30:.2f} GiB"
    if free < need:
        return Check("disk_space", "fail", msg + ": free space first", details)
    if free < need * DISK_MARGIN:
        return Check("disk_space", "warn", msg + f" (less than {DISK_MARGIN:.0f}x margin)", details)
    return Check("disk_space", "ok", msg, details)


def check_workdir(workdir: Path) -> Check:
    target = workdir if workdir.exists() else workdir.parent
    if not target.exists():
        return Check("workdir", "fail", f"neither {workdir} nor its parent exists; create it "
                     "(a named volume in compose)")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".doctor-"):
            pass
    except OSError as err:
        return Check("workdir", "fail", f"cannot write in {target} ({err.strerror}); fix its owner/permissions")
    return Check("workdir", "ok", f"{workdir} writable" + ("" if workdir.exists() else " (will be created)"))


def check_gpu() -> Check:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("gpu", "ok", f"{len(names)} CUDA device(s): {', '.join(names)}", {"cuda": True, "devices": names})
    return Check("gpu", "ok", "no CUDA device: training runs on the CPU (slower; fine for small models)",
                 {"cuda": False, "torch": torch.__version__})


# ----------------------------------------------------------------------------- the whole preflight
def run_doctor(config_path: Path, workdir: Path, *, timeout_s: float = 10.0, network: bool = True) -> Report:
    """Every check; a config that does not validate stops there (exit 2), other failures do not stop the rest."""
    from privdistill.identity import load_private_key
    from site_agent.config import load_site_config

    try:
        cfg = load_site_config(config_path)
    except ConfigError as err:
        return Report([Check("config", "fail", f"{len(err.problems)} problem(s) in {config_path}",
                             {"problems": err.problems})])
    checks = [Check("config", "ok", f"{config_path} is valid (site {cfg.site.id})")]
    now = dt.datetime.now(dt.UTC)
    site = cfg.site
    key_check = _guard("site_key", lambda: check_private_file("site_key", site.key_file, load_private_key))
    checks.append(key_check)
    node_key = site.key_file.parent / NODE_KEY_FILE
    checks.append(_guard("flower_node_key",
                         lambda: check_private_file("flower_node_key", node_key, _load_ec_key, optional=True)))
    checks.append(_guard("ca_certificate", lambda: check_ca(site.ca_file, now)))
    if network:
        tls = _guard("coordinator_tls",
                     lambda: check_coordinator_tls(site.coordinator_url, site.ca_file, now, timeout_s))
        checks.append(tls)
        if tls.status == "fail" or key_check.status != "ok":
            why = "coordinator TLS check failed" if tls.status == "fail" else "site key unusable"
            checks.append(Check("site_registered", "skip", why))
        else:
            key = load_private_key(site.key_file)
            try:
                checks.extend(check_coordinator_api(site.coordinator_url, site.ca_file, site.id, key, timeout_s))
            except Exception as err:
                checks.append(Check("coordinator_health", "fail", f"{type(err).__name__}: {err}"))
        checks.append(_guard("data_source", lambda: check_data_source(cfg.data.source, timeout_s)))
    else:
        checks.append(Check("coordinator_tls", "skip", "--offline"))
        checks.append(_guard("data_source", lambda: check_data_source(cfg.data.source, timeout_s))
                      if cfg.data.source.type != "pacs" else Check("data_source", "skip", "--offline (PACS source)"))
    checks.append(_guard("workdir", lambda: check_workdir(workdir)))
    checks.append(_guard("disk_space", lambda: check_disk(workdir, cfg)))
    checks.append(_guard("gpu", check_gpu))
    return Report(checks)


def format_report(report: Report) -> str:
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    lines = [f"[{marks[c.status]}] {c.name:<18} {c.message}" for c in report.checks]
    for c in report.checks:
        lines.extend(f"       - {p}" for p in c.details.get("problems", []))
    failed = [c.name for c in report.checks if c.status == "fail"]
    lines.append("")
    lines.append(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} (exit {report.exit_code})")
    return "\n".join(lines)
