"""Upload client against an in-memory protocol-v1 double: chunking, resume, retries, backoff, refusals, logs."""

from __future__ import annotations

import email.utils
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs

from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError, PrivacyPolicyError, RetryableNetworkError, ShardVerificationError
from privdistill.identity import generate_key, public_key_b64, verify_request
from privdistill.shard import parse_manifest, write_shard
from site_agent import upload as up

URL = "https://coordinator.test/base"
SITE = "site-a"
Fault = Callable[[httpx.Request, int], "str | httpx.Response | None"]


class FakeCoordinator:
    """Protocol v1 in memory: signed requests, create-or-resume, HEAD/GET/PATCH, verify on completion.

    ``fault(request, n)`` (n counts every request) may return "drop_before" (connection error, nothing
    processed), "drop_after" (processed, response lost), "advance" (another copy of this PATCH landed
    first), "forget" (the upload vanishes) or an httpx.Response to answer instead."""

    def __init__(self, keys: dict[str, str], fault: Fault | None = None) -> None:
        self.keys, self.fault, self.revoked = keys, fault, set[str]()
        self.uploads: dict[str, dict] = {}
        self.accepted: dict[str, str] = {}
        self.requests: list[httpx.Request] = []
        self.force_reject: str | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        action = self.fault(request, len(self.requests)) if self.fault else None
        if isinstance(action, httpx.Response):
            return action
        if action == "drop_before":
            raise httpx.ConnectError("connection reset by peer", request=request)
        if action == "forget":
            self.uploads.clear()
        if action == "advance":
            self._patch(request)
        resp = self._dispatch(request)
        if action == "drop_after":
            raise httpx.ReadError("connection closed while reading the response", request=request)
        return resp

    def _dispatch(self, request: httpx.Request) -> httpx.Response:
        site = request.headers.get("X-Privdistill-Site", "")
        if site not in self.keys:
            return _err(401, "unknown_site")
        try:
            verify_request(request.headers, request.method, request.url.raw_path.decode(), request.content,
                           self.keys[site])
        except ShardVerificationError as err:
            return _err(401, err.reason)
        if site in self.revoked:
            return _err(403, "revoked_site")
        path = request.url.path.removeprefix("/base")
        if request.method == "POST" and path == "/v1/uploads":
            return self._create(site, json.loads(request.content))
        upload = self.uploads.get(path.rsplit("/", 1)[-1])
        if upload is None or upload["site"] != site:
            return _err(404, "unknown_upload")
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Upload-Offset": str(len(upload["data"])),
                                                "Upload-Length": str(upload["size"]), "Upload-State": upload["state"]})
        if request.method == "GET":
            return httpx.Response(200, json={"upload_id": upload["id"], "state": upload["state"],
                                             "offset": len(upload["data"]), "size": upload["size"],
                                             "reason": upload["reason"], "shard_sha256": upload["sha"]})
        return self._patch(request)

    def _create(self, site: str, body: dict) -> httpx.Response:
        manifest = parse_manifest(body["manifest"].encode())
        if manifest.tar_sha256 in self.accepted:
            u = self.uploads[self.accepted[manifest.tar_sha256]]
            return httpx.Response(200, json={"upload_id": u["id"], "state": "accepted", "offset": u["size"],
                                             "size": u["size"], "shard_sha256": u["sha"], "duplicate": True})
        for u in self.uploads.values():
            if u["site"] == site and u["sha"] == manifest.tar_sha256 and u["state"] == "receiving":
                return httpx.Response(200, json={"upload_id": u["id"], "state": "receiving",
                                                 "offset": len(u["data"]), "size": u["size"]})
        uid = secrets.token_hex(16)
        self.uploads[uid] = {"id": uid, "site": site, "sha": manifest.tar_sha256, "size": manifest.tar_size,
                             "data": bytearray(), "state": "receiving", "reason": None}
        return httpx.Response(201, json={"upload_id": uid, "state": "receiving", "offset": 0,
                                         "size": manifest.tar_size})

    def _patch(self, request: httpx.Request) -> httpx.Response:
        upload = self.uploads[request.url.path.rsplit("/", 1)[-1]]
        offset = int(request.headers["Upload-Offset"])
        if offset != len(upload["data"]):
            return _err(409, "offset_mismatch", offset=len(upload["data"]))
        if offset + len(request.content) > upload["size"]:
            return _err(413, "request_too_large")
        upload["data"] += request.content
        if len(upload["data"]) == upload["size"]:
            ok = hashlib.sha256(upload["data"]).hexdigest() == upload["sha"] and not self.force_reject
            upload["state"] = "accepted" if ok else "rejected"
            upload["reason"] = None if ok else (self.force_reject or "hash_mismatch")
            if ok:
                self.accepted[upload["sha"]] = upload["id"]
        return httpx.Response(204, headers={"Upload-Offset": str(len(upload["data"])), "Upload-State": upload["state"]})

    def patches(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "PATCH"]


def _err(status: int, code: str, **extra: object) -> httpx.Response:
    return httpx.Response(status, json={"error": code, "detail": f"test double says {code}", **extra})


@pytest.fixture(scope="module")
def site_key():
    return generate_key()


@pytest.fixture(scope="module")
def shard(tmp_path_factory, site_key) -> Path:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (40, 1, 28, 28)).astype(np.float32)
    kept = ImageSet(images, labels=rng.integers(0, 2, 40), class_names=["a", "b"])
    out = tmp_path_factory.mktemp("shard") / "s0"
    write_shard(kept, out, site_id=SITE, shard_id="s0", config_hash="0" * 64, privacy={"kept": 40}, key=site_key)
    return out


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record backoff sleeps instead of sleeping; fixed jitter RNG."""
    slept: list[float] = []
    monkeypatch.setattr(up, "_sleep", slept.append)
    monkeypatch.setattr(up, "_rng", __import__("random").Random(1))
    return slept


def _upload(shard: Path, key, fake: FakeCoordinator, **kw) -> up.UploadResult:
    kw.setdefault("chunk_size", 8192)
    return up.upload_shard(shard, url=URL, ca_file=Path("/nonexistent"), site_id=SITE, key=key,
                           transport=fake.transport(), **kw)


def test_uploads_in_signed_chunks_and_server_bytes_equal_local(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)})
    tar = (shard / "shard.tar").read_bytes()
    res = _upload(shard, site_key, fake)
    assert res.state == "accepted" and not res.duplicate and res.reason is None
    assert res.shard_sha256 == hashlib.sha256(tar).hexdigest()
    assert bytes(fake.uploads[res.upload_id]["data"]) == tar
    patches = fake.patches()
    assert len(patches) == -(-len(tar) // 8192) and all(len(p.content) <= 8192 for p in patches)
    assert [int(p.headers["Upload-Offset"]) for p in patches] == list(range(0, len(tar), 8192))
    assert all(p.headers["Content-Type"] == "application/offset+octet-stream" for p in patches)
    assert all(r.url.path.startswith("/base/v1/uploads") for r in fake.requests)  # prefix is part of the signed path
    assert res.bytes_sent == len(tar) and res.resumed_from == 0 and sleeps == []


def test_resumes_an_earlier_upload_from_the_server_offset(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)})
    tar = (shard / "shard.tar").read_bytes()
    manifest = parse_manifest((shard / "manifest.json").read_bytes())
    fake.uploads["u1"] = {"id": "u1", "site": SITE, "sha": manifest.tar_sha256, "size": len(tar),
                          "data": bytearray(tar[:30000]), "state": "receiving", "reason": None}
    res = _upload(shard, site_key, fake)
    assert (res.upload_id, res.state, res.resumed_from) == ("u1", "accepted", 30000)
    assert res.bytes_sent == len(tar) - 30000
    assert int(fake.patches()[0].headers["Upload-Offset"]) == 30000
    assert bytes(fake.uploads["u1"]["data"]) == tar


def test_reupload_of_an_accepted_shard_is_a_noop(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)})
    first = _upload(shard, site_key, fake)
    n = len(fake.requests)
    again = _upload(shard, site_key, fake)
    assert again.duplicate and again.state == "accepted" and again.upload_id == first.upload_id
    assert again.bytes_sent == 0 and [r.method for r in fake.requests[n:]] == ["POST"]


def test_lost_response_after_applied_chunk_heads_and_continues(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)},
                           fault=lambda r, n: "drop_after" if n in (3, 7) and r.method == "PATCH" else None)
    tar = (shard / "shard.tar").read_bytes()
    res = _upload(shard, site_key, fake)
    assert res.state == "accepted" and bytes(fake.uploads[res.upload_id]["data"]) == tar
    methods = [r.method for r in fake.requests]
    assert methods[3] == "HEAD" and methods[7] == "HEAD"  # the request after each break asks for the offset
    assert len(sleeps) == 2 and res.requests == len(fake.requests)


def test_progress_resets_the_attempt_budget(shard, site_key, sleeps) -> None:
    # every third request fails; 10+ failures in total, never 2 in a row, with max_attempts=2
    fake = FakeCoordinator({SITE: public_key_b64(site_key)},
                           fault=lambda r, n: "drop_before" if n % 3 == 0 else None)
    res = _upload(shard, site_key, fake, chunk_size=4096, max_attempts=2)
    assert res.state == "accepted" and len(sleeps) >= 10
    assert bytes(fake.uploads[res.upload_id]["data"]) == (shard / "shard.tar").read_bytes()


def test_backoff_is_exponential_with_jitter_then_gives_up(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)}, fault=lambda r, n: "drop_before")
    with pytest.raises(RetryableNetworkError, match="5 times in a row"):
        _upload(shard, site_key, fake, max_attempts=5, backoff_s=0.5)
    assert len(fake.requests) == 5 and len(sleeps) == 4
    for i, s in enumerate(sleeps):
        assert 0.5 * 2**i / 2 <= s <= 0.5 * 2**i
    assert len(set(sleeps)) == 4  # jittered, not a fixed ladder


def test_backoff_is_capped(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)}, fault=lambda r, n: "drop_before")
    with pytest.raises(RetryableNetworkError):
        _upload(shard, site_key, fake, max_attempts=12, backoff_s=1.0)
    assert max(sleeps) <= up.MAX_BACKOFF_S and max(sleeps) >= up.MAX_BACKOFF_S / 2


def test_retry_after_is_honoured_for_503_and_429(shard, site_key, sleeps) -> None:
    date = email.utils.formatdate(time.time() + 40, usegmt=True)

    def fault(r: httpx.Request, n: int):
        if n == 2:
            return httpx.Response(503, headers={"Retry-After": "7"}, json={"error": "overloaded"})
        if n == 5:
            return httpx.Response(429, headers={"Retry-After": date}, text="slow down")
        return None

    fake = FakeCoordinator({SITE: public_key_b64(site_key)}, fault=fault)
    res = _upload(shard, site_key, fake, backoff_s=0.01)
    assert res.state == "accepted" and len(sleeps) == 2
    assert sleeps[0] >= 7 and 35 <= sleeps[1] <= 41


def test_offset_mismatch_resyncs_without_sleeping(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)},
                           fault=lambda r, n: "advance" if n == 4 and r.method == "PATCH" else None)
    tar = (shard / "shard.tar").read_bytes()
    res = _upload(shard, site_key, fake)
    assert res.state == "accepted" and bytes(fake.uploads[res.upload_id]["data"]) == tar
    offsets = [int(p.headers["Upload-Offset"]) for p in fake.patches()]
    assert offsets[:4] == [0, 8192, 16384, 24576]  # the 409 at 16384 told it that chunk had landed already
    assert res.bytes_sent == len(tar) - 8192 and sleeps == []


def test_upload_forgotten_by_the_server_is_created_again(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)},
                           fault=lambda r, n: "forget" if n == 4 else None)
    res = _upload(shard, site_key, fake)
    assert res.state == "accepted" and len(fake.uploads) == 1 and res.upload_id in fake.uploads
    assert [r.method for r in fake.requests].count("POST") == 2


def test_revoked_site_raises_privacy_error_without_retrying(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)})
    fake.revoked.add(SITE)
    with pytest.raises(PrivacyPolicyError, match="revoked_site") as info:
        _upload(shard, site_key, fake)
    assert info.value.reason == "revoked_site" and len(fake.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status,code", [(401, "bad_signature"), (422, "bad_manifest_signature"),
                                         (413, "shard_too_large"), (422, "site_mismatch")])
def test_definitive_refusals_raise_shard_verification_error(shard, site_key, sleeps, status, code) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)}, fault=lambda r, n: _err(status, code))
    with pytest.raises(ShardVerificationError) as info:
        _upload(shard, site_key, fake)
    assert info.value.reason == code and f"HTTP {status}" in str(info.value)
    assert len(fake.requests) == 1 and sleeps == []


def test_wrong_site_key_is_refused_by_signature_check(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(generate_key())})
    with pytest.raises(ShardVerificationError) as info:
        _upload(shard, site_key, fake)
    assert info.value.reason == "bad_signature" and len(fake.requests) == 1


def test_rejected_shard_returns_the_server_reason(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)})
    fake.force_reject = "prompt_outside_vocabulary"
    res = _upload(shard, site_key, fake)
    assert res.state == "rejected" and res.reason == "prompt_outside_vocabulary"
    assert fake.requests[-1].method == "GET"


def test_local_shard_that_differs_from_its_manifest_is_refused_before_sending(shard, site_key, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("manifest.json", "manifest.sig"):
        (bad / name).write_bytes((shard / name).read_bytes())
    tar = bytearray((shard / "shard.tar").read_bytes())
    tar[700] ^= 0xFF
    (bad / "shard.tar").write_bytes(bytes(tar))
    fake = FakeCoordinator({SITE: public_key_b64(site_key)})
    with pytest.raises(ShardVerificationError) as info:
        _upload(bad, site_key, fake)
    assert info.value.reason == "hash_mismatch" and fake.requests == []
    with pytest.raises(ShardVerificationError) as info:
        _upload(tmp_path, site_key, fake)
    assert info.value.reason == "not_a_shard"


def test_bad_settings_are_config_errors(shard, site_key) -> None:
    with pytest.raises(ConfigError, match="https://"):
        up.upload_shard(shard, url="http://c:8443", ca_file=Path("ca.pem"), site_id=SITE, key=site_key)
    with pytest.raises(ConfigError, match="does not exist"):
        up.upload_shard(shard, url="https://c:8443", ca_file=Path("/nonexistent/ca.pem"), site_id=SITE, key=site_key)
    with pytest.raises(ConfigError, match="chunk_size"):
        up.upload_shard(shard, url="https://c:8443", ca_file=Path("ca.pem"), site_id=SITE, key=site_key, chunk_size=0)


def test_logs_one_debug_line_per_attempt_one_summary_and_no_secrets(shard, site_key, sleeps) -> None:
    fake = FakeCoordinator({SITE: public_key_b64(site_key)},
                           fault=lambda r, n: "drop_before" if n == 3 else None)
    structlog.reset_defaults()
    with capture_logs() as logs:
        res = _upload(shard, site_key, fake)
    attempts = [e for e in logs if e["event"] == "upload_attempt"]
    summary = [e for e in logs if e["event"] == "shard_upload_finished"]
    assert len(attempts) == len(fake.requests) == res.requests and all(e["log_level"] == "debug" for e in attempts)
    assert len(summary) == 1 and summary[0]["log_level"] == "info" and summary[0]["retries"] == 1
    secrets_seen = {r.headers["X-Privdistill-Signature"] for r in fake.requests}
    text = json.dumps(logs, default=str)
    assert not any(s in text for s in secrets_seen) and "PRIVATE" not in text and "signature" not in text.lower()


def test_retry_after_parsing() -> None:
    assert up._retry_after("12") == 12.0 and up._retry_after(None) is None and up._retry_after("soon") is None
    assert 58 <= up._retry_after(email.utils.formatdate(time.time() + 60, usegmt=True)) <= 60
    assert up._retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
