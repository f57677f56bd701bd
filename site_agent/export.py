"""Export: the gate's verdict, a private snapshot of exactly the bytes it verified, the upload, and
the audit record. Uploading from the snapshot closes the window between checking and sending."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privdistill.errors import PrivacyPolicyError, RetryableNetworkError, ShardVerificationError
from privdistill.shard import MANIFEST, SHARD_TAR, SIGNATURE, Manifest, sha256_path
from site_agent.audit import audit
from site_agent.config import SiteConfig
from site_agent.gate import check_export, shard_dir
from site_agent.state import SiteState

SNAPSHOT_DIR = ".export"


@dataclass
class Exported:
    shard_id: str
    manifest: Manifest
    upload_id: str
    duplicate: bool
    bytes_sent: int


def _snapshot(src: Path, workdir: Path, manifest: Manifest) -> Path:
    """Copy the verified shard into a directory only this agent writes (0700) and check the copy
    against what the gate verified; the upload reads the copy, never the original again."""
    root = workdir / SNAPSHOT_DIR
    root.mkdir(mode=0o700, exist_ok=True)
    snap = Path(tempfile.mkdtemp(prefix=f"{manifest.shard_id}.", dir=root))
    expected_manifest = sha256_path(src / MANIFEST)
    for name in (SHARD_TAR, MANIFEST, SIGNATURE):
        shutil.copyfile(src / name, snap / name)
    if sha256_path(snap / SHARD_TAR) != manifest.tar_sha256 or sha256_path(snap / MANIFEST) != expected_manifest:
        shutil.rmtree(snap, ignore_errors=True)
        raise ShardVerificationError("the shard changed while it was being exported; run export again",
                                     "changed_during_export")
    return snap


def export_shard(workdir: Path, ref: str | Path, cfg: SiteConfig, key: Ed25519PrivateKey) -> Exported:
    """Gate, snapshot, upload, record. Raises the gate's or the coordinator's refusal
    (PrivacyPolicyError / ShardVerificationError) or RetryableNetworkError; each is audited."""
    from site_agent import upload

    workdir = Path(workdir)
    manifest = check_export(workdir, ref, cfg)  # audits its own refusals
    sid = manifest.shard_id
    common = {"shard_id": sid, "site_id": cfg.site.id, "destination": cfg.site.coordinator_url}
    try:
        snap = _snapshot(shard_dir(workdir, sid), workdir, manifest)
    except ShardVerificationError as err:
        audit(workdir, "export_refused", reason=err.reason, detail=str(err), **common)
        raise
    try:
        result = upload.upload_shard(snap, url=cfg.site.coordinator_url, ca_file=cfg.site.ca_file,
                                     site_id=cfg.site.id, key=key)
    except RetryableNetworkError as err:
        audit(workdir, "export_failed", reason="network", detail=str(err), **common)
        raise
    except (PrivacyPolicyError, ShardVerificationError) as err:
        audit(workdir, "export_refused", by="coordinator", reason=getattr(err, "reason", type(err).__name__),
              detail=str(err), **common)
        raise
    finally:
        shutil.rmtree(snap, ignore_errors=True)
    if result.state != "accepted" or result.shard_sha256 != manifest.tar_sha256:
        reason = result.reason if result.state != "accepted" else "accepted_sha256_differs"
        audit(workdir, "export_refused", by="coordinator", reason=reason, upload_id=result.upload_id, **common)
        raise ShardVerificationError(f"the coordinator did not accept {sid}: {reason}", reason or "rejected")
    SiteState(workdir).mark_exported(sid, destination=cfg.site.coordinator_url, upload_id=result.upload_id)
    audit(workdir, "exported", tar_sha256=manifest.tar_sha256,
          manifest_sha256=sha256_path(shard_dir(workdir, sid) / MANIFEST), bytes=manifest.tar_size,
          bytes_sent=result.bytes_sent, upload_id=result.upload_id, duplicate=result.duplicate,
          sample_count=manifest.sample_count, **common)
    return Exported(sid, manifest, result.upload_id, result.duplicate, result.bytes_sent)
