"""Resumable, signed shard upload to the coordinator (protocol v1): create-or-resume, HEAD, PATCH chunks."""

from __future__ import annotations

import email.utils
import json
import random
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privdistill.errors import ConfigError, PrivacyPolicyError, RetryableNetworkError, ShardVerificationError
from privdistill.identity import CHUNK_CONTENT_TYPE, H_UPLOAD_OFFSET, H_UPLOAD_REASON, H_UPLOAD_STATE, sign_request
from privdistill.shard import MANIFEST, SHARD_TAR, SIGNATURE, parse_manifest, sha256_path

log = structlog.get_logger(__name__)

MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 600.0
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# Indirections the unit tests replace (so backoff can be asserted without sleeping).
_sleep = time.sleep
_rng = random.Random()

# the coordinator's default limits.max_chunk_bytes: a shard of up to 8 MiB is one request
DEFAULT_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class UploadResult:
    upload_id: str
    state: Literal["accepted", "rejected"]
    shard_sha256: str
    reason: str | None
    duplicate: bool
    bytes_sent: int  # chunk bytes the server acknowledged to this call
    resumed_from: int = 0  # the server's offset when this call started sending (> 0: an earlier upload resumed)
    requests: int = 0  # HTTP requests made, failed ones included


class _Retry(Exception):
    """One attempt failed in a way that retrying may fix."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


class _Resync(Exception):
    """The server's offset differs from ours (409): continue from ``offset``."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _UnknownUpload(Exception):
    """The server no longer knows the upload (404): create it again."""


def upload_shard(
    shard_dir: Path, *, url: str, ca_file: Path, site_id: str, key: Ed25519PrivateKey,
    chunk_size: int = DEFAULT_CHUNK_BYTES, max_attempts: int = 8, backoff_s: float = 0.5, timeout_s: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> UploadResult:
    """Upload one packaged shard directory; resumes an earlier, interrupted upload of the same shard.

    ``max_attempts`` bounds consecutive failed attempts (connection errors, timeouts, 5xx, 429) without
    progress; any acknowledged byte resets the count. Between attempts: exponential backoff from
    ``backoff_s`` with jitter, at least the server's Retry-After. Raises RetryableNetworkError when the
    attempts run out, ShardVerificationError / PrivacyPolicyError when the coordinator refuses for good.
    ``transport`` replaces the network (tests, custom stacks); HTTPS_PROXY / NO_PROXY are honoured."""
    if chunk_size < 1 or max_attempts < 1 or backoff_s < 0 or timeout_s <= 0:
        raise ConfigError([f"upload settings out of range: chunk_size={chunk_size} (>= 1), max_attempts="
                           f"{max_attempts} (>= 1), backoff_s={backoff_s} (>= 0), timeout_s={timeout_s} (> 0)"])
    shard = _LocalShard.open(Path(shard_dir))
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.netloc:
        raise ConfigError([f"coordinator_url {url!r} must be an https:// URL (uploads are never sent in clear)"])
    verify: ssl.SSLContext | bool = True
    if transport is None:
        verify = _ssl_context(Path(ca_file))
    client = httpx.Client(base_url=url.rstrip("/"), verify=verify, trust_env=True, transport=transport,
                          timeout=httpx.Timeout(timeout_s), follow_redirects=False)
    with client:
        up = _Uploader(client, parts.path.rstrip("/"), shard, site_id, key, chunk_size, max_attempts, backoff_s)
        return up.run()


def _ssl_context(ca_file: Path) -> ssl.SSLContext:
    if not ca_file.is_file():
        raise ConfigError([f"CA file {ca_file} does not exist (copy ca.pem from the site's provisioning bundle)"])
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as err:
        raise ConfigError([f"CA file {ca_file} is not a PEM certificate ({err})"]) from None


@dataclass(frozen=True)
class _LocalShard:
    tar: Path
    manifest_text: str
    signature_text: str
    sha256: str
    size: int
    shard_id: str

    @classmethod
    def open(cls, shard_dir: Path) -> _LocalShard:
        missing = [n for n in (SHARD_TAR, MANIFEST, SIGNATURE) if not (shard_dir / n).is_file()]
        if missing:
            raise ShardVerificationError(f"{shard_dir} has no {', '.join(missing)}: not a packaged shard "
                                         "(run the package stage first)", "not_a_shard")
        body = (shard_dir / MANIFEST).read_bytes()
        manifest = parse_manifest(body)
        tar = shard_dir / SHARD_TAR
        if tar.stat().st_size != manifest.tar_size or sha256_path(tar) != manifest.tar_sha256:
            raise ShardVerificationError(f"{tar} does not match its manifest (changed after packaging?); "
                                         "package the shard again", "hash_mismatch")
        return cls(tar, body.decode(), (shard_dir / SIGNATURE).read_text(), manifest.tar_sha256,
                   manifest.tar_size, manifest.shard_id)


class _Uploader:
    """One upload's state machine: create-or-resume, then PATCH from the server's offset until done."""

    def __init__(self, client: httpx.Client, prefix: str, shard: _LocalShard, site_id: str,
                 key: Ed25519PrivateKey, chunk_size: int, max_attempts: int, backoff_s: float) -> None:
        self.client, self.prefix, self.shard, self.site = client, prefix, shard, site_id
        self.key, self.chunk_size, self.max_attempts, self.backoff_s = key, chunk_size, max_attempts, backoff_s
        self.upload_id: str | None = None
        self.offset = 0
        self.bytes_sent = 0
        self.requests = 0
        self.failures = 0  # consecutive, reset by progress
        self.retries = 0

    # ------------------------------------------------------------------ driver
    def run(self) -> UploadResult:
        t0 = time.monotonic()
        created = self._with_retries(self._create)
        resumed_from = self.offset
        state = created.get("state", "receiving")
        duplicate = bool(created.get("duplicate", False))
        reason = None
        with open(self.shard.tar, "rb") as fh:
            while state == "receiving":
                if self.offset >= self.shard.size:  # all bytes stored, the outcome not yet seen
                    state, reason = self._with_retries(self._status)
                else:
                    state, reason = self._with_retries(lambda: self._patch(fh))
        if state == "rejected" and reason is None:
            state, reason = self._with_retries(self._status)
        if state not in ("accepted", "rejected"):
            raise ShardVerificationError(f"coordinator left upload {self.upload_id} in state {state!r}",
                                         "unexpected_state")
        result = UploadResult(self.upload_id or "", state, self.shard.sha256, reason, duplicate,
                              self.bytes_sent, resumed_from, self.requests)
        elapsed = time.monotonic() - t0
        (log.info if state == "accepted" else log.warning)(
            "shard_upload_finished", shard_id=self.shard.shard_id, shard_sha256=self.shard.sha256,
            upload_id=self.upload_id, state=state, reason=reason, duplicate=duplicate, size=self.shard.size,
            resumed_from=resumed_from, bytes_sent=self.bytes_sent, requests=self.requests, retries=self.retries,
            seconds=round(elapsed, 3), mib_per_s=round(self.bytes_sent / max(elapsed, 1e-9) / (1 << 20), 2))
        return result

    def _with_retries(self, step: Any) -> Any:
        """Run ``step`` until it succeeds; on retryable failures back off, then learn the offset again."""
        need_head = False
        while True:
            try:
                if need_head and self.upload_id is not None:
                    self._head()
                    need_head = False
                return step()
            except _Resync as r:
                stuck = r.offset == self.offset  # we sent exactly that offset and were still told otherwise
                self._progress(r.offset)
                self.offset = r.offset
                if stuck:
                    self._count_failure(f"offset_mismatch (server at {r.offset})", None)
            except _UnknownUpload:
                self.upload_id = None
                self._count_failure("unknown_upload: creating it again", None)
                self._with_retries(self._create)
            except _Retry as r:
                need_head = True
                self._count_failure(str(r), r.retry_after)

    def _count_failure(self, what: str, retry_after: float | None) -> None:
        self.failures += 1
        if self.failures >= self.max_attempts:
            raise RetryableNetworkError(
                f"upload of shard {self.shard.shard_id} failed {self.failures} times in a row without progress "
                f"(last: {what}); {self.offset}/{self.shard.size} bytes are stored; run the upload again later "
                "to resume")
        delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (self.failures - 1))
        delay = delay / 2 + _rng.uniform(0, delay / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        self.retries += 1
        log.debug("upload_retry", upload_id=self.upload_id, failure=self.failures, error=what,
                  sleep_s=round(delay, 3), offset=self.offset)
        _sleep(delay)

    def _progress(self, new_offset: int) -> None:
        if new_offset > self.offset:
            self.failures = 0

    # ------------------------------------------------------------------ protocol steps
    def _create(self) -> dict[str, Any]:
        body = json.dumps({"manifest": self.shard.manifest_text, "signature": self.shard.signature_text}).encode()
        resp = self._request("POST", "/v1/uploads", body, {"Content-Type": "application/json"})
        if resp.status_code not in (200, 201):
            self._refuse(resp)
        data = _json(resp)
        try:
            self.upload_id = str(data["upload_id"])
            new_offset = int(data.get("offset", 0))
        except (KeyError, TypeError, ValueError):
            raise _Retry(f"create answered {resp.status_code} without upload_id/offset") from None
        self._progress(new_offset)
        self.offset = new_offset
        return data

    def _head(self) -> None:
        resp = self._request("HEAD", f"/v1/uploads/{self.upload_id}")
        if resp.status_code != 200:
            self._refuse(resp)
        try:
            new_offset = int(resp.headers[H_UPLOAD_OFFSET])
        except (KeyError, ValueError):
            raise _Retry("HEAD answered without a valid Upload-Offset") from None
        self._progress(new_offset)
        self.offset = new_offset

    def _status(self) -> tuple[str, str | None]:
        resp = self._request("GET", f"/v1/uploads/{self.upload_id}")
        if resp.status_code != 200:
            self._refuse(resp)
        data = _json(resp)
        state = data.get("state")
        if state == "receiving":
            self.offset = int(data.get("offset", self.offset))
            if self.offset < self.shard.size:
                return "receiving", None
            raise _Retry("all bytes sent, the coordinator has not decided yet")
        return str(state), data.get("reason")

    def _patch(self, fh: Any) -> tuple[str, str | None]:
        fh.seek(self.offset)
        chunk = fh.read(min(self.chunk_size, self.shard.size - self.offset))
        resp = self._request("PATCH", f"/v1/uploads/{self.upload_id}", chunk,
                             {H_UPLOAD_OFFSET: str(self.offset), "Content-Type": CHUNK_CONTENT_TYPE})
        if resp.status_code not in (200, 204):
            self._refuse(resp)
        try:
            new_offset = int(resp.headers[H_UPLOAD_OFFSET])
        except (KeyError, ValueError):
            raise _Retry("PATCH answered without a valid Upload-Offset") from None
        self.bytes_sent += len(chunk)
        self._progress(new_offset)
        self.offset = new_offset
        return resp.headers.get(H_UPLOAD_STATE, "receiving"), resp.headers.get(H_UPLOAD_REASON)

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                 ) -> httpx.Response:
        full = self.prefix + path
        hdrs = dict(headers or {})
        ctype, offset = hdrs.pop("Content-Type", None), hdrs.pop(H_UPLOAD_OFFSET, None)
        request = self.client.build_request(method, path, content=body, headers=hdrs)
        # signed with a fresh timestamp and nonce on every attempt: Host (as sent), Content-Type, Upload-Offset
        request.headers.update(sign_request(self.key, self.site, method, full, body, host=request.headers["Host"],
                                            content_type=ctype, upload_offset=offset))
        self.requests += 1
        t0 = time.monotonic()
        try:
            resp = self.client.send(request)
        except httpx.TransportError as err:
            if _tls_verification_failed(err):
                raise ShardVerificationError(
                    f"the coordinator's TLS certificate does not verify against the site's CA file ({err}); "
                    "check coordinator_url and ca_file from the provisioning bundle", "tls_verification_failed",
                ) from None
            log.debug("upload_attempt", method=method, upload_id=self.upload_id, offset=self.offset,
                      size=len(body), error=type(err).__name__, seconds=round(time.monotonic() - t0, 3))
            raise _Retry(f"{method} {path}: {type(err).__name__}: {err}") from None
        log.debug("upload_attempt", method=method, upload_id=self.upload_id, offset=self.offset, size=len(body),
                  status=resp.status_code, seconds=round(time.monotonic() - t0, 3))
        if resp.status_code in RETRYABLE_STATUS:
            raise _Retry(f"{method} {path}: HTTP {resp.status_code} {error_code(resp)}",
                         _retry_after(resp.headers.get("Retry-After")))
        return resp

    def _refuse(self, resp: httpx.Response) -> None:
        """Turn a definitive refusal into the error the operator acts on (or a resync)."""
        code = error_code(resp)
        data = _json(resp) if resp.content else {}
        detail = str(data.get("detail") or resp.reason_phrase or "")
        if resp.status_code == 409 and "offset" in data:
            raise _Resync(int(data["offset"]))
        if resp.status_code == 404 and self.upload_id is not None and resp.request.method != "POST":
            raise _UnknownUpload()
        message = f"coordinator refused shard {self.shard.shard_id} (HTTP {resp.status_code} {code}): {detail}"
        if resp.status_code == 403:
            raise PrivacyPolicyError(f"{message} [reason: {code}]", code)
        raise ShardVerificationError(message, code)


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def error_code(resp: httpx.Response) -> str:
    """The coordinator's machine-readable error code of a response (its JSON `error`), else http_NNN."""
    code = _json(resp).get("error") if resp.content else None
    return str(code) if code else f"http_{resp.status_code}"


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _tls_verification_failed(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
