"""The content-addressed shard store (STATE/store/<sha[:2]>/<sha>/) and the staging area for partial uploads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from privdistill.shard import MANIFEST, SHARD_TAR, SIGNATURE, sha256_path


def shard_dir(state_dir: Path, tar_sha256: str) -> Path:
    """Where an accepted shard lives: shard.tar, manifest.json and manifest.sig."""
    return Path(state_dir) / "store" / tar_sha256[:2] / tar_sha256


def staging_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "staging"


def staging_path(state_dir: Path, upload_id: str) -> Path:
    return staging_dir(state_dir) / f"{upload_id}.part"


def ensure_layout(state_dir: Path) -> None:
    for d in (Path(state_dir), staging_dir(state_dir), Path(state_dir) / "store"):
        d.mkdir(parents=True, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(state_dir: Path, tar_sha256: str, tar_src: Path, manifest: bytes, signature: str) -> Path:
    """Place a verified shard into the store atomically (temp dir, then rename); ``tar_src`` is left in place.

    Idempotent: if the final directory exists and holds the same tar (a crash after the rename but
    before the ledger commit), it is kept."""
    final = shard_dir(state_dir, tar_sha256)
    if final.is_dir() and (final / SHARD_TAR).is_file() and sha256_path(final / SHARD_TAR) == tar_sha256:
        return final
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        try:
            os.link(tar_src, tmp / SHARD_TAR)
        except OSError:
            shutil.copyfile(tar_src, tmp / SHARD_TAR)
        for name, data in ((MANIFEST, manifest), (SIGNATURE, (signature.strip() + "\n").encode())):
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for name in (SHARD_TAR, MANIFEST, SIGNATURE):
            os.chmod(tmp / name, 0o444)
        _fsync_dir(tmp)
        tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_stale_temp(state_dir: Path) -> int:
    """Delete half-built store directories left by a crash; returns how many."""
    n = 0
    for tmp in (Path(state_dir) / "store").glob("*/.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        n += 1
    return n
