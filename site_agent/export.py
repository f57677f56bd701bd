"""Export: the gate's verdict, a private snapshot of exactly the bytes it verified, the upload, and
the audit record. Uploading from the snapshot closes the window between checking and sending."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privdistill.errors import PrivacyPolicyError, RetryableNetworkError, ShardVerificationError
from privdistill.identity import load_private_key, public_key_b64
from privdistill.shard import MANIFEST, SHARD_TAR, SIGNATURE, Manifest, sha256_path, verify_shard_dir
from site_agent.audit_log import audit
from site_agent.config import SiteConfig
from site_agent.gate import check_export, shard_dir
from site_agent.state import ShardRow, SiteState

SNAPSHOT_DIR = ".export"


@dataclass
class Exported:
    shard_id: str
    manifest: Manifest
    upload_id: str
    duplicate: bool
    bytes_sent: int


def _copy_nofollow(src_dir: Path, name: str, dest: Path) -> None:
    """Copy one regular file without following a symlink at the folder or the file."""
    dfd = os.open(src_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOCTTY", 0), dir_fd=dfd)
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise OSError(f"{name} is not a regular file")
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _snapshot(src: Path, workdir: Path, row: ShardRow, public_b64: str) -> tuple[Path, Manifest, str]:
    """Copy the shard into a directory only this agent writes (0700), without following links, and check the
    copy against what was APPROVED (the register's manifest and tar hashes), its signature and every member.
    The upload reads the copy, never the original again. Returns (snapshot, its manifest, its manifest hash)."""
    root = workdir / SNAPSHOT_DIR
    root.mkdir(mode=0o700, exist_ok=True)
    snap = Path(tempfile.mkdtemp(prefix=f"{row.shard_id}.", dir=root))
    try:
        for name in (SHARD_TAR, MANIFEST, SIGNATURE):
            _copy_nofollow(src, name, snap / name)
        manifest_sha = sha256_path(snap / MANIFEST)
        if manifest_sha != row.manifest_sha256 or sha256_path(snap / SHARD_TAR) != row.tar_sha256:
            raise ShardVerificationError("the shard changed after it was approved (its manifest or tar differs from "
                                         "the approved one); nothing was sent: re-package and approve again",
                                         "changed_during_export")
        manifest = verify_shard_dir(snap, public_b64)
        if manifest.tar_sha256 != row.tar_sha256 or manifest.shard_id != row.shard_id:
            raise ShardVerificationError("the snapshot's manifest does not describe the approved shard",
                                         "changed_during_export")
    except OSError as err:
        shutil.rmtree(snap, ignore_errors=True)
        raise ShardVerificationError(f"the shard could not be copied for export without following links ({err}); "
                                     "nothing was sent", "changed_during_export") from None
    except BaseException:
        shutil.rmtree(snap, ignore_errors=True)
        raise
    return snap, manifest, manifest_sha


def snapshot_approved(workdir: Path, shard_id: str, cfg: SiteConfig) -> tuple[Path, Manifest, str]:
    """A verified private copy of the approved shard ``shard_id`` (after the gate passed it); the caller removes it."""
    row = SiteState(workdir).require(shard_id)
    public = public_key_b64(load_private_key(cfg.site.key_file))
    return _snapshot(shard_dir(workdir, shard_id), Path(workdir), row, public)


def export_shard(workdir: Path, ref: str | Path, cfg: SiteConfig, key: Ed25519PrivateKey) -> Exported:
    """Gate, snapshot, upload, record. Raises the gate's or the coordinator's refusal
    (PrivacyPolicyError / ShardVerificationError) or RetryableNetworkError; each is audited."""
    from site_agent import upload

    workdir = Path(workdir)
    checked = check_export(workdir, ref, cfg)  # audits its own refusals
    sid = checked.shard_id
    common = {"shard_id": sid, "site_id": cfg.site.id, "destination": cfg.site.coordinator_url}
    try:
        snap, manifest, manifest_sha = snapshot_approved(workdir, sid, cfg)
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
        audit(workdir, "export_refused", by="coordinator", reason=err.reason, detail=str(err), **common)
        raise
    finally:
        shutil.rmtree(snap, ignore_errors=True)
    if result.state != "accepted" or result.shard_sha256 != manifest.tar_sha256:
        reason = result.reason if result.state != "accepted" else "accepted_sha256_differs"
        audit(workdir, "export_refused", by="coordinator", reason=reason, upload_id=result.upload_id, **common)
        raise ShardVerificationError(f"the coordinator did not accept {sid}: {reason}", reason or "rejected")
    SiteState(workdir).mark_exported(sid, destination=cfg.site.coordinator_url, upload_id=result.upload_id)
    audit(workdir, "exported", tar_sha256=manifest.tar_sha256,  # what was sent: the snapshot's hashes
          manifest_sha256=manifest_sha, bytes=manifest.tar_size,
          bytes_sent=result.bytes_sent, upload_id=result.upload_id, duplicate=result.duplicate,
          sample_count=manifest.sample_count, **common)
    return Exported(sid, manifest, result.upload_id, result.duplicate, result.bytes_sent)
