"""The upload state machine: create (manifest checks), append chunks at the ledger offset, verify and accept
exactly once, and reconcile staging files with the ledger after a crash."""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import secrets
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from pydantic import ValidationError

from coordinator import store
from coordinator.acceptance import Acceptance, AcceptanceUnavailable, check_manifest, load_acceptance
from coordinator.audit_log import AuditLog
from coordinator.config import CoordinatorConfig
from coordinator.ledger import Ledger, QuotaExceeded, UploadRow
from coordinator.metrics import Metrics
from coordinator.schemas import ApiError, CreateUploadRequest, UploadInfo
from privdistill.errors import ShardVerificationError
from privdistill.identity import H_UPLOAD_OFFSET
from privdistill.shard import parse_manifest, verify_manifest_signature
from privdistill.shard_stream import TarStreamVerifier

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

LOCK_STRIPES = 64
HOUSEKEEPING_EVERY_S = 60.0
# bytes received after the last durable offset before the staging file is fsync'd and the ledger offset advanced
# (the last chunk is always made durable before verification); a crash loses at most this much per upload, which
# the site re-sends from the offset HEAD reports
# uploads whose streaming verification state a worker keeps in memory (each holds at most one partial member, at
# most MAX_MEMBER_BYTES); an evicted one is rebuilt from its staging file on its next chunk
STREAMS_KEPT = 32


def _iso(t: float) -> str:
    """Unix time as the ledger's timestamp text (ISO 8601, UTC, milliseconds): comparable as strings."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")

log = structlog.get_logger("coordinator.uploads")


def info(row: UploadRow, received: int | None = None) -> UploadInfo:
    """``received``: where the next chunk goes (bytes in staging, possibly ahead of the ledger's durable offset)."""
    offset = row.offset if received is None or row.state != "receiving" else received
    return UploadInfo(upload_id=row.id, state=row.state, offset=offset, size=row.size, reason=row.reason,
                      shard_sha256=row.tar_sha256, duplicate=row.reason == "duplicate")


class Uploads:
    """All upload transitions; every method is blocking (call it from a worker thread)."""

    def __init__(self, config: CoordinatorConfig, ledger: Ledger, audit: AuditLog, metrics: Metrics) -> None:
        self.config, self.ledger, self.audit, self.metrics = config, ledger, audit, metrics
        self.state_dir = config.state_dir
        # striped: a bounded set of locks however many uploads a long-running coordinator sees; each stripe is a
        # thread lock (this process) plus an flock on STATE/locks/NN.lock (the other worker processes)
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._last_housekeeping = -math.inf
        self._streams: OrderedDict[str, TarStreamVerifier] = OrderedDict()
        self._streams_lock = threading.Lock()
        self._lock_dir = Path(self.state_dir) / "locks"

    @contextmanager
    def _lock(self, upload_id: str) -> Iterator[None]:
        stripe = zlib.crc32(upload_id.encode()) % LOCK_STRIPES
        with self._locks[stripe]:
            self._lock_dir.mkdir(exist_ok=True)
            fd = os.open(self._lock_dir / f"{stripe:02d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _acceptance(self) -> Acceptance:
        try:
            return load_acceptance(self.config)
        except AcceptanceUnavailable as err:
            log.error("training_config_unreadable", path=str(self.config.training_config))
            raise ApiError(503, "coordinator_misconfigured", f"{err}; retry later") from None

    def _refuse_shard(self, site: str, sha: str | None, status: int, err: ShardVerificationError, *,
                      upload_id: str | None = None) -> ApiError:
        """The one place a refused shard is counted (metrics), recorded (ledger: the upload rejected, or an event
        when no upload exists yet) and audited; returns the error to answer with."""
        self.metrics.shards_rejected.labels(reason=err.reason).inc()
        if upload_id is None:
            self.ledger.record_event("rejected", site=site, shard_sha256=sha, reason=err.reason)
        else:
            self.ledger.reject(upload_id, err.reason)
        self.audit.event("rejected", site=site, shard_sha256=sha, reason=err.reason,
                         **({} if upload_id is None else {"upload_id": upload_id}))
        return ApiError(status, err.reason, str(err))

    # ------------------------------------------------------------------ POST /v1/uploads
    def create(self, site: str, body: bytes) -> tuple[UploadInfo, int]:
        try:
            req = CreateUploadRequest.model_validate_json(body)
        except ValidationError as err:
            raise ApiError(400, "invalid_request", 'body must be JSON {"manifest": "<manifest.json text>", '
                           f'"signature": "<manifest.sig text>"}} ({err.error_count()} problem(s))') from None
        manifest_bytes = req.manifest.encode()
        limits = self.config.limits
        if len(manifest_bytes) > limits.max_manifest_bytes:
            raise ApiError(413, "request_too_large", f"manifest is {len(manifest_bytes)} bytes; the limit is "
                           f"{limits.max_manifest_bytes}")
        row = self.ledger.site(site)
        assert row is not None  # authenticated
        try:
            verify_manifest_signature(manifest_bytes, req.signature, row.public_key)
            manifest = parse_manifest(manifest_bytes)
            if manifest.site_id != site:
                raise ShardVerificationError(f"manifest is for site {manifest.site_id!r} but the request is signed "
                                             f"by {site!r}; a site uploads only its own shards", "site_mismatch")
            check_manifest(manifest, self._acceptance(), self.ledger)  # before any byte is stored
        except ShardVerificationError as err:
            raise self._refuse_shard(site, None, 422, err) from None
        sha = manifest.tar_sha256
        if manifest.tar_size > limits.max_shard_bytes:
            too_large = ShardVerificationError(f"shard is {manifest.tar_size} bytes; the coordinator accepts at most "
                                               f"{limits.max_shard_bytes} (split it into smaller shards)",
                                               "shard_too_large")
            raise self._refuse_shard(site, sha, 413, too_large)
        existing = self.ledger.shard(sha)
        if existing is not None and existing.status == "removed":
            removed = ShardVerificationError("the coordinator's operator removed this shard; it is not taken again "
                                             "(package a new shard, or ask the operator)", "shard_removed")
            raise self._refuse_shard(site, sha, 409, removed)
        if existing is not None:
            self.audit.event("duplicate", site=site, shard_sha256=sha)
            return UploadInfo(upload_id=existing.upload_id, state="accepted", offset=manifest.tar_size,
                              size=manifest.tar_size, shard_sha256=sha, duplicate=True), 200
        self.housekeeping()
        try:
            upload, created = self.ledger.create_upload(
                secrets.token_hex(16), site, sha, manifest.tar_size, req.manifest, req.signature.strip(),
                max_open=limits.max_open_uploads_per_site, max_open_bytes=limits.max_open_bytes_per_site)
        except QuotaExceeded as err:
            raise ApiError(429, err.reason, str(err), headers={"Retry-After": "60"}) from None
        if not created:
            with self._lock(upload.id):
                upload = self._sync(upload)
                return info(upload, self._received(upload)), 200
        self.metrics.uploads_created.inc()
        self.audit.event("upload_created", site=site, shard_sha256=sha, upload_id=upload.id, size=upload.size)
        return info(upload), 201

    # ------------------------------------------------------------------ HEAD / GET
    def owned(self, site: str, upload_id: str) -> UploadRow:
        row = self.ledger.upload(upload_id)
        if row is None or row.site != site:
            raise ApiError(404, "unknown_upload", "no such upload for this site (start one with POST /v1/uploads)")
        return row

    def status(self, site: str, upload_id: str) -> UploadInfo:
        row = self.owned(site, upload_id)
        with self._lock(upload_id):
            row = self._sync(row)
            return info(row, self._received(row))

    # ------------------------------------------------------------------ PATCH
    def append(self, site: str, upload_id: str, offset_header: str | None, chunk: bytes, *,
               sha256: Hash | None = None) -> UploadInfo:
        """Store one chunk at the upload's offset and verify it as it arrives. ``sha256``: the hash object that hashed
        exactly ``chunk`` (the authenticated body's): the first chunk's is carried on as the shard's hash."""
        self.owned(site, upload_id)
        try:
            offset = int(offset_header) if offset_header is not None else -1
        except ValueError:
            offset = -1
        if offset < 0:
            raise ApiError(400, "invalid_request", "Upload-Offset header must be the non-negative byte offset "
                           "of this chunk (HEAD the upload to learn it)")
        with self._lock(upload_id):
            row = self._sync(self.owned(site, upload_id))
            received = self._received(row)
            if row.state != "receiving" and offset == row.offset and not chunk:
                return info(row)
            if row.state != "receiving" or offset != received:
                raise ApiError(409, "offset_mismatch", f"upload is {row.state} at offset {received}; resume "
                               "from there", offset=received, headers={H_UPLOAD_OFFSET: str(received)})
            end = offset + len(chunk)
            if end > row.size:
                raise ApiError(413, "request_too_large", f"chunk ends at byte {end}, past the shard size {row.size}")
            if chunk:
                durable = end == row.size or end - row.offset >= self.config.limits.durable_every_bytes
                self._write(store.staging_path(self.state_dir, upload_id), offset, chunk, durable=durable)
                self._stream(row, offset).feed(chunk, sha256=sha256)  # verified as it arrives: never read again
                if durable:  # under the lock the ledger is still at row.offset
                    self.ledger.set_offset(upload_id, row.offset, end)
                self.metrics.upload_bytes.inc(len(chunk))
            if end == row.size:  # every byte is here and durable (fsync'd above): verify, install, accept
                row = self._finalize(row)
            return info(row, end)

    def _received(self, row: UploadRow) -> int:
        """Bytes of a receiving upload in its staging file: at or past the ledger's (durable) offset. Caller holds
        the upload's lock."""
        part = store.staging_path(self.state_dir, row.id)
        return part.stat().st_size if row.state == "receiving" and part.exists() else row.offset

    @staticmethod
    def _write(part: Path, offset: int, chunk: bytes, *, durable: bool) -> None:
        """Write the chunk at ``offset`` (fsync'd when ``durable``); the caller advances the ledger offset only over
        durable bytes. On failure the file is cut back to ``offset``, so its size is always a chunk boundary."""
        part.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                os.lseek(fd, offset, os.SEEK_SET)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                os.ftruncate(fd, offset + len(chunk))
                if durable:
                    os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, offset)
                raise
        finally:
            os.close(fd)

    def _stream(self, row: UploadRow, offset: int) -> TarStreamVerifier:
        """This upload's streaming verifier, positioned at ``offset``: kept in memory from its earlier chunks, or
        caught up from the staging file (after a restart, an eviction, or chunks taken by another worker)."""
        with self._streams_lock:
            stream = self._streams.pop(row.id, None)
        if stream is None or stream.offset > offset:
            stream = TarStreamVerifier(parse_manifest(row.manifest.encode()))
        if stream.offset < offset:
            stream.feed_file(store.staging_path(self.state_dir, row.id), offset)
        with self._streams_lock:
            self._streams[row.id] = stream
            while len(self._streams) > STREAMS_KEPT:
                self._streams.popitem(last=False)
        return stream

    def _forget_stream(self, upload_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(upload_id, None)

    # ------------------------------------------------------------------ completion and recovery
    def _sync(self, row: UploadRow, *, startup: bool = False) -> UploadRow:
        """Make the .part file agree with the ledger offset (lower the offset if durable bytes were lost; at startup
        also cut off bytes past it, which may not have reached the disk) and finish an upload that has all its
        bytes. Bytes past the offset while serving are chunks received since the last group fsync (or from a worker
        process that died mid-write: a prefix of an authenticated chunk); they stand. Caller holds the lock."""
        if row.state != "receiving":
            return row
        part = store.staging_path(self.state_dir, row.id)
        actual = part.stat().st_size if part.exists() else 0
        if actual > row.offset and startup:
            os.truncate(part, row.offset)
            actual = row.offset
        elif actual < row.offset:
            log.warning("staging_shorter_than_ledger", upload_id=row.id, ledger_offset=row.offset, on_disk=actual)
            self.ledger.set_offset(row.id, row.offset, actual)
        fresh = self.ledger.upload(row.id)
        assert fresh is not None
        if actual == fresh.size and fresh.state == "receiving":
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)  # durable before the ledger's offset says so
            finally:
                os.close(fd)
            self.ledger.set_offset(fresh.id, fresh.offset, actual)
            fresh = self._finalize(fresh)
        return fresh

    def _finalize(self, row: UploadRow) -> UploadRow:
        """All ``row.size`` bytes are in staging and durable: check, then install and accept, or reject."""
        part = store.staging_path(self.state_dir, row.id)
        manifest_bytes = row.manifest.encode()
        acceptance = self._acceptance()  # unreadable config: 503, the bytes stay staged for a retry
        stream = self._stream(row, row.size)
        manifest = stream.manifest
        try:
            check_manifest(manifest, acceptance, self.ledger)
            # the coordinator's words, not the manifest's; a refusal's reason comes from verify_tar on the file
            stream.finish_or_explain(part, vocabulary=acceptance.vocabulary)
        except ShardVerificationError as err:
            self._forget_stream(row.id)
            self._refuse_shard(row.site, row.tar_sha256, 422, err, upload_id=row.id)
            part.unlink(missing_ok=True)
        else:
            store.install(self.state_dir, row.tar_sha256, part, manifest_bytes, row.signature)
            added = self.ledger.accept(row.id, shard_id=manifest.shard_id, sample_count=manifest.sample_count,
                                       manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest())
            part.unlink(missing_ok=True)
            self._forget_stream(row.id)
            if added:
                self.metrics.shards_accepted.inc()
            self.audit.event("accepted" if added else "duplicate", site=row.site, shard_sha256=row.tar_sha256,
                             upload_id=row.id, sample_count=manifest.sample_count, shard_id=manifest.shard_id)
        done = self.ledger.upload(row.id)
        assert done is not None
        return done

    def housekeeping(self, *, force: bool = False) -> dict[str, int]:
        """Expire open uploads idle for ``upload_expiry_s`` (their staging files removed) and prune the manifests
        of uploads rejected more than ``rejected_retention_days`` ago. Runs at most once a minute unless forced."""
        now = time.time()
        if not force and now - self._last_housekeeping < HOUSEKEEPING_EVERY_S:
            return {"expired": 0, "pruned": 0}
        self._last_housekeeping = now
        limits = self.config.limits
        expired = self.ledger.expire_uploads(_iso(now - limits.upload_expiry_s))
        for row in expired:
            store.staging_path(self.state_dir, row.id).unlink(missing_ok=True)
            self.audit.event("upload_expired", site=row.site, shard_sha256=row.tar_sha256, upload_id=row.id,
                             reason="expired", offset=row.offset, size=row.size)
        parts = list(store.staging_dir(self.state_dir).glob("*.part"))  # listed before the open uploads are read
        open_ids = {u.id for u in self.ledger.open_uploads()}
        for part in parts:
            if part.stem not in open_ids:  # closed meanwhile (e.g. its site was revoked)
                part.unlink(missing_ok=True)
        pruned = self.ledger.prune_rejected(_iso(now - limits.rejected_retention_days * 86400))
        if pruned:
            self.audit.event("rejected_pruned", count=pruned, retention_days=limits.rejected_retention_days)
        if expired or pruned:
            log.info("housekeeping", expired=len(expired), pruned=pruned)
        return {"expired": len(expired), "pruned": pruned}

    def reconcile(self) -> dict[str, int]:
        """On startup: drop staging files of closed or unknown uploads, re-align open ones with the ledger."""
        counts = {"stale_temp": store.remove_stale_temp(self.state_dir), "orphan_parts": 0, "open": 0}
        open_rows = {u.id: u for u in self.ledger.open_uploads()}
        for part in store.staging_dir(self.state_dir).glob("*.part"):
            if part.stem not in open_rows:
                part.unlink(missing_ok=True)
                counts["orphan_parts"] += 1
        for row in open_rows.values():
            with self._lock(row.id):
                try:
                    self._sync(row, startup=True)
                except ApiError as err:  # e.g. an unreadable training config: finished on the next request
                    log.warning("reconcile_deferred", upload_id=row.id, reason=err.reason)
            counts["open"] += 1
        counts.update(self.housekeeping(force=True))
        log.info("staging_reconciled", **counts)
        return counts

