"""Coordinator upload API in-process: signed resumable uploads, exactly-once acceptance, every rejection path."""

from __future__ import annotations

import functools
import io
import json
import sqlite3
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from coordinator.api import create_app
from coordinator.config import CoordinatorConfig
from coordinator.store import shard_dir, staging_path
from privdistill.data.types import ImageSet
from privdistill.identity import generate_key, sign, sign_request
from privdistill.shard import Conditioning, Manifest, encode_png, sha256_bytes, write_shard

A, B = "site-a", "site-b"
CHUNK = 4096


# ----------------------------------------------------------------------------- helpers
def make_app(tmp_path: Path, **limits: int):
    cfg = CoordinatorConfig(tls={"cert": tmp_path / "x.pem", "key": tmp_path / "x.key"},
                            state_dir=tmp_path / "state",
                            limits={"max_chunk_bytes": CHUNK, "max_shard_bytes": 1 << 20, **limits})
    return create_app(cfg)


@pytest.fixture(scope="module")
def keys():
    return {A: generate_key(), B: generate_key(), "other": generate_key()}


@pytest.fixture()
def env(tmp_path, keys):
    from privdistill.identity import public_key_b64

    app = make_app(tmp_path)
    for site in (A, B):
        app.state.ledger.add_site(site, public_key_b64(keys[site]))
    with TestClient(app) as client:
        yield app, client


@pytest.fixture(scope="module")
def shard(tmp_path_factory, keys):
    """A real 6-sample shard of site-a (~13 KiB tar: several 4 KiB chunks)."""
    rng = np.random.default_rng(0)
    kept = ImageSet(images=rng.uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32),
                    labels=np.array([0, 1, 0, 1, 0, 1]), class_names=["cat", "dog"])
    out = tmp_path_factory.mktemp("shard") / "s1"
    write_shard(kept, out, site_id=A, shard_id="s1", config_hash="0" * 64, privacy={"kept": 6}, key=keys[A])
    return out


def signed(key, site, method, path, body=b"", headers=None, *, now=None, nonce=None):
    """Signed headers as the site client sends them: Host, Content-Type and Upload-Offset inside the signature."""
    extra = dict(headers or {})
    h = sign_request(key, site, method, path, body, host="testserver", content_type=extra.pop("Content-Type", None),
                     upload_offset=extra.pop("Upload-Offset", None), now=now, nonce=nonce)
    return {**h, **extra}


def call(client, key, site, method, path, body=b"", headers=None, *, now=None):
    return client.request(method, path, content=body, headers=signed(key, site, method, path, body, headers, now=now))


def create_body(manifest: bytes, signature: str) -> bytes:
    return json.dumps({"manifest": manifest.decode(), "signature": signature}).encode()


def start(client, key, site, manifest: bytes, signature: str):
    return call(client, key, site, "POST", "/v1/uploads", create_body(manifest, signature))


def send_all(client, key, site, upload_id: str, data: bytes, chunk: int = CHUNK, start_at: int = 0):
    """PATCH ``data`` (the shard's bytes from ``start_at`` on) in chunks; every answer must be 204."""
    r = None
    for off in range(0, len(data), chunk):
        r = call(client, key, site, "PATCH", f"/v1/uploads/{upload_id}", data[off:off + chunk],
                 {"Upload-Offset": str(start_at + off), "Content-Type": "application/offset+octet-stream"})
        assert r.status_code == 204, r.text
    return r


def metric(app, name: str, reason: str | None = None) -> float:
    return app.state.metrics.value(name, **({"reason": reason} if reason else {}))


def count_rows(app, table: str) -> int:
    with sqlite3.connect(app.state.config.ledger_path) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def assert_nothing_stored(app) -> None:
    state = app.state.config.state_dir
    assert list((state / "store").rglob("*")) == []
    assert list((state / "staging").iterdir()) == []
    assert app.state.ledger.accepted_shards() == []
    assert count_rows(app, "shards") == 0


def shard_files(d: Path) -> tuple[bytes, bytes, str]:
    return (d / "shard.tar").read_bytes(), (d / "manifest.json").read_bytes(), (d / "manifest.sig").read_text()


# ----------------------------------------------------------------------------- happy path
def test_upload_in_chunks_accepted_once_then_duplicate(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    assert len(tar) > 3 * CHUNK
    r = start(client, keys[A], A, manifest, sig)
    assert r.status_code == 201, r.text
    up = r.json()
    assert (up["state"], up["offset"], up["size"], up["duplicate"]) == ("receiving", 0, len(tar), False)
    assert len(up["upload_id"]) == 32

    last = send_all(client, keys[A], A, up["upload_id"], tar)
    assert last.headers["Upload-State"] == "accepted"
    assert last.headers["Upload-Offset"] == str(len(tar))

    sha = sha256_bytes(tar)
    rows = app.state.ledger.accepted_shards()
    assert [(s.tar_sha256, s.site, s.shard_id, s.sample_count) for s in rows] == [(sha, A, "s1", 6)]
    assert rows[0].dir == shard_dir(app.state.config.state_dir, sha)
    assert shard_files(rows[0].dir) == (tar, manifest, sig.strip() + "\n")
    assert list((app.state.config.state_dir / "staging").iterdir()) == []
    got = call(client, keys[A], A, "GET", f"/v1/uploads/{up['upload_id']}").json()
    assert got == {"upload_id": up["upload_id"], "state": "accepted", "offset": len(tar), "size": len(tar),
                   "shard_sha256": sha, "reason": None, "duplicate": False}

    again = start(client, keys[A], A, manifest, sig)
    assert again.status_code == 200
    assert again.json() | {} == {"upload_id": up["upload_id"], "state": "accepted", "offset": len(tar),
                                 "size": len(tar), "shard_sha256": sha, "reason": None, "duplicate": True}
    assert count_rows(app, "shards") == 1 and count_rows(app, "uploads") == 1
    assert metric(app, "privdistill_shards_accepted_total") == 1
    assert metric(app, "privdistill_uploads_created_total") == 1
    assert metric(app, "privdistill_upload_bytes_total") == len(tar)
    kinds = [json.loads(line)["event"] for line in (app.state.config.state_dir / "audit.log").read_text().splitlines()]
    assert kinds == ["upload_created", "accepted", "duplicate"]


def test_resume_returns_open_upload_and_restart_truncates_unrecorded_bytes(env, keys, shard, monkeypatch):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    first = start(client, keys[A], A, manifest, sig).json()
    send_all(client, keys[A], A, first["upload_id"], tar[:CHUNK])
    # chunks are fsync'd in groups: the ledger's (durable) offset stays behind until limits.durable_every_bytes or the end,
    # while resume and HEAD answer with the bytes received
    assert app.state.ledger.upload(first["upload_id"]).offset == 0
    resumed = start(client, keys[A], A, manifest, sig)
    assert resumed.status_code == 200
    assert resumed.json()["upload_id"] == first["upload_id"] and resumed.json()["offset"] == CHUNK
    ups = app.state.uploads  # now every chunk is made durable
    monkeypatch.setattr(ups, "config", ups.config.model_copy(
        update={"limits": ups.config.limits.model_copy(update={"durable_every_bytes": CHUNK})}))
    send_all(client, keys[A], A, first["upload_id"], tar[CHUNK:2 * CHUNK], start_at=CHUNK)
    assert app.state.ledger.upload(first["upload_id"]).offset == 2 * CHUNK
    part = staging_path(app.state.config.state_dir, first["upload_id"])
    with open(part, "ab") as fh:  # bytes written before a crash, past the durable offset
        fh.write(b"x" * 100)
    app.state.uploads.reconcile()  # what serve does at start
    assert part.stat().st_size == 2 * CHUNK
    head = call(client, keys[A], A, "HEAD", f"/v1/uploads/{first['upload_id']}")
    assert head.status_code == 200
    assert (head.headers["Upload-Offset"], head.headers["Upload-Length"], head.headers["Upload-State"]) == \
        (str(2 * CHUNK), str(len(tar)), "receiving")
    part.write_bytes(tar[:100])  # bytes lost (e.g. staging restored from an old backup): the ledger steps back
    head = call(client, keys[A], A, "HEAD", f"/v1/uploads/{first['upload_id']}")
    assert head.headers["Upload-Offset"] == "100" and app.state.ledger.upload(first["upload_id"]).offset == 100
    send_all(client, keys[A], A, first["upload_id"], tar[100:], start_at=100)
    assert (app.state.ledger.accepted_shards()[0].dir / "shard.tar").read_bytes() == tar


def test_reconcile_drops_orphan_parts_and_finishes_complete_uploads(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    part = staging_path(app.state.config.state_dir, up["upload_id"])
    part.write_bytes(tar)  # all bytes on disk, ledger still at 0 (crash before the ledger update)
    orphan = staging_path(app.state.config.state_dir, "deadbeef")
    orphan.write_bytes(b"junk")
    counts = app.state.uploads.reconcile()
    assert counts["orphan_parts"] == 1 and counts["open"] == 1
    assert not orphan.exists()
    assert part.stat().st_size == 0  # never trust bytes the ledger did not record
    assert app.state.ledger.upload(up["upload_id"]).offset == 0
    # all bytes durably recorded but not yet verified (crash before accept): startup finishes the job
    part.write_bytes(tar)
    assert app.state.ledger.set_offset(up["upload_id"], 0, len(tar))
    app.state.uploads.reconcile()
    assert [s.tar_sha256 for s in app.state.ledger.accepted_shards()] == [sha256_bytes(tar)]
    assert not part.exists()


def test_concurrent_final_chunks_accept_exactly_once(env, keys, shard):
    from concurrent.futures import ThreadPoolExecutor

    app, client = env
    tar, manifest, sig = shard_files(shard)
    with ThreadPoolExecutor(4) as pool:  # concurrent create-or-resume: one upload
        ids = {r.json()["upload_id"] for r in pool.map(lambda _: start(TestClient(app), keys[A], A, manifest, sig),
                                                          range(4))}
    assert len(ids) == 1
    upload_id = ids.pop()
    cut = len(tar) - 100
    send_all(client, keys[A], A, upload_id, tar[:cut])

    def last(_: int):
        return call(TestClient(app), keys[A], A, "PATCH", f"/v1/uploads/{upload_id}", tar[cut:],
                    {"Upload-Offset": str(cut)})

    with ThreadPoolExecutor(4) as pool:
        codes = sorted(r.status_code for r in pool.map(last, range(4)))
    assert codes == [204, 409, 409, 409]
    assert count_rows(app, "shards") == 1 and metric(app, "privdistill_shards_accepted_total") == 1


def asgi(app, method: str, path: str, headers: dict[str, str], parts: list[bytes], *, stall_after: int | None = None):
    """Drive the ASGI app directly (the test client reads a whole body before the app sees it): the answer and how
    many body parts the app pulled. ``stall_after``: the client stops sending after that many parts."""
    import asyncio

    pulled, sent = [], []

    async def receive():
        if stall_after is not None and len(pulled) >= stall_after:
            await asyncio.sleep(3600)
        if len(pulled) < len(parts):
            pulled.append(len(pulled))
            return {"type": "http.request", "body": parts[len(pulled) - 1], "more_body": len(pulled) < len(parts)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "testserver", **headers}.items()],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body) if body else {}, len(pulled)


def test_streamed_body_over_limit_refused_while_reading(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    path = f"/v1/uploads/{up['upload_id']}"
    body = tar[:CHUNK + 512] + b"x" * 40960  # chunked transfer: no Content-Length to refuse up front
    parts = [body[i:i + 512] for i in range(0, len(body), 512)]
    status, answer, pulled = asgi(app, "PATCH", path, signed(keys[A], A, "PATCH", path, body, {"Upload-Offset": "0"}),
                                  parts)
    assert (status, answer["error"]) == (413, "request_too_large")
    # the part that crosses the 4096-byte limit is the last one read: 9 of 89
    assert pulled == CHUNK // 512 + 1 and len(parts) == 89
    assert app.state.ledger.upload(up["upload_id"]).offset == 0
    assert not staging_path(app.state.config.state_dir, up["upload_id"]).exists()


def test_body_is_not_read_before_the_headers_authenticate(env, keys, shard):
    app, _ = env
    parts = [b"\0" * 65536] * 64  # 4 MiB, never read
    cases = [("site-z", keys["other"], "bad_signature"), (A, keys[B], "bad_signature"),
             (A, keys[A], "expired_timestamp")]
    for site, key, reason in cases:
        body = b"".join(parts)
        now = time.time() - 400 if reason == "expired_timestamp" else None
        headers = signed(key, site, "POST", "/v1/uploads", body, {"Content-Type": "application/json"}, now=now)
        status, answer, pulled = asgi(app, "POST", "/v1/uploads", headers, parts)
        assert (status, answer["error"], pulled) == (401, reason, 0), site
    assert_nothing_stored(app)
    assert count_rows(app, "uploads") == 0


def test_a_body_that_stalls_is_cut_at_the_deadline(tmp_path, keys, shard):
    from privdistill.identity import public_key_b64

    app = make_app(tmp_path, body_timeout_s=0.3)
    app.state.ledger.add_site(A, public_key_b64(keys[A]))
    _, manifest, sig = shard_files(shard)
    body = create_body(manifest, sig)
    t0 = time.monotonic()
    status, answer, pulled = asgi(app, "POST", "/v1/uploads", signed(keys[A], A, "POST", "/v1/uploads", body),
                                  [body[:100], body[100:]], stall_after=1)
    assert (status, answer["error"], pulled) == (408, "body_timeout", 1)
    assert time.monotonic() - t0 < 5
    assert count_rows(app, "uploads") == 0


# ----------------------------------------------------------------------------- authentication
def _assert_refused(app, r, status: int, reason: str, counter: str = "privdistill_requests_rejected_total") -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"] == reason
    assert r.json()["detail"]
    assert metric(app, counter, reason) == 1
    assert_nothing_stored(app)


def test_unknown_site_answers_like_a_wrong_key(env, keys, shard):
    app, client = env
    _, manifest, sig = shard_files(shard)
    unknown = start(client, keys["other"], "site-z", manifest, sig)
    wrong_key = start(client, keys["other"], A, manifest, sig)
    assert (unknown.status_code, unknown.json()) == (wrong_key.status_code, wrong_key.json())
    assert unknown.json()["error"] == "bad_signature" and unknown.status_code == 401
    assert metric(app, "privdistill_requests_rejected_total", "bad_signature") == 2
    assert_nothing_stored(app)
    assert count_rows(app, "uploads") == 0


def test_revoked_site_is_told_only_when_the_request_is_signed_by_it(env, keys, shard):
    app, client = env
    _, manifest, sig = shard_files(shard)
    app.state.ledger.revoke_site(A)
    r = start(client, keys[A], A, manifest, sig)
    _assert_refused(app, r, 403, "revoked_site")
    revoked_at = app.state.ledger.site(A).revoked_at
    assert revoked_at[:10] not in r.text and "revoked at" not in r.text  # no date disclosed
    forged = start(client, keys["other"], A, manifest, sig)  # anyone else learns nothing about the revocation
    assert (forged.status_code, forged.json()["error"]) == (401, "bad_signature")
    assert count_rows(app, "uploads") == 0


def test_replayed_request_is_refused(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    path = f"/v1/uploads/{up['upload_id']}"
    headers = signed(keys[A], A, "PATCH", path, tar[:CHUNK], {"Upload-Offset": "0"})
    assert client.patch(path, content=tar[:CHUNK], headers=headers).status_code == 204
    app.state.ledger.set_offset(up["upload_id"], CHUNK, 0)  # even where the replayed chunk would fit again
    r = client.patch(path, content=tar[:CHUNK], headers=headers)
    assert (r.status_code, r.json()["error"]) == (401, "replayed_request")
    assert app.state.ledger.upload(up["upload_id"]).offset == 0
    # the same nonce is refused on another path too (a nonce is per site, not per request line)
    get = signed(keys[A], A, "GET", path, nonce=headers["X-Privdistill-Nonce"])
    assert client.get(path, headers=get).json()["error"] == "replayed_request"


def test_future_timestamps_are_bounded_tighter_than_past_ones(env, keys, shard):
    app, client = env
    path = "/v1/uploads/" + "0" * 32
    ahead = call(client, keys[A], A, "GET", path, now=time.time() + 45)
    assert (ahead.status_code, ahead.json()["error"]) == (401, "expired_timestamp")
    assert call(client, keys[A], A, "GET", path, now=time.time() + 20).json()["error"] == "unknown_upload"
    assert call(client, keys[A], A, "GET", path, now=time.time() - 250).json()["error"] == "unknown_upload"


def test_a_signed_header_given_twice_is_refused(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    path = f"/v1/uploads/{up['upload_id']}"
    headers = list(signed(keys[A], A, "PATCH", path, tar[:CHUNK], {"Upload-Offset": "0"}).items())
    r = client.patch(path, content=tar[:CHUNK], headers=[*headers, ("Upload-Offset", str(CHUNK))])
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request") and "upload-offset" in r.json()["detail"]
    assert app.state.ledger.upload(up["upload_id"]).offset == 0


@pytest.mark.parametrize("header,value", [("Upload-Offset", str(CHUNK)), ("Content-Type", "application/json"),
                                          ("Host", "coordinator.example:8443")])
def test_offset_content_type_and_host_are_signed(env, keys, shard, header, value):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    path = f"/v1/uploads/{up['upload_id']}"
    headers = signed(keys[A], A, "PATCH", path, tar[:CHUNK],
                     {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    r = client.patch(path, content=tar[:CHUNK], headers={**headers, header: value})
    assert (r.status_code, r.json()["error"]) == (401, "bad_signature")
    assert app.state.ledger.upload(up["upload_id"]).offset == 0
    assert not staging_path(app.state.config.state_dir, up["upload_id"]).exists()


def test_bad_request_signature(env, keys, shard):
    app, client = env
    _, manifest, sig = shard_files(shard)
    _assert_refused(app, start(client, keys[B], A, manifest, sig), 401, "bad_signature")


def test_expired_timestamp(env, keys, shard):
    app, client = env
    _, manifest, sig = shard_files(shard)
    r = call(client, keys[A], A, "POST", "/v1/uploads", create_body(manifest, sig), now=time.time() - 301 - 60)
    _assert_refused(app, r, 401, "expired_timestamp")


def test_body_tampered_after_signing(env, keys, shard):
    app, client = env
    _, manifest, sig = shard_files(shard)
    body = create_body(manifest, sig)
    h = signed(keys[A], A, "POST", "/v1/uploads", body)
    r = client.post("/v1/uploads", content=body.replace(b"site-a", b"site-b", 1), headers=h)
    _assert_refused(app, r, 401, "body_hash_mismatch")


def test_missing_auth_headers(env):
    app, client = env
    _assert_refused(app, client.post("/v1/uploads", content=b"{}"), 401, "missing_auth_headers")


# ----------------------------------------------------------------------------- manifest checks
def test_manifest_signed_by_another_sites_key(env, keys, shard):
    app, client = env
    _, manifest, _ = shard_files(shard)
    r = start(client, keys[A], A, manifest, sign(keys[B], manifest))
    _assert_refused(app, r, 422, "bad_manifest_signature")
    assert metric(app, "privdistill_shards_rejected_total", "bad_manifest_signature") == 1


def test_manifest_for_another_site(env, keys, shard):
    app, client = env
    _, manifest, _ = shard_files(shard)
    data = json.loads(manifest)
    data["site_id"] = B
    forged = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    r = start(client, keys[A], A, forged, sign(keys[A], forged))
    _assert_refused(app, r, 422, "site_mismatch")


def test_malformed_manifest_json(env, keys):
    app, client = env
    bad = b'{"site_id": "site-a", '
    _assert_refused(app, start(client, keys[A], A, bad, sign(keys[A], bad)), 422, "malformed_manifest")
    assert count_rows(app, "uploads") == 0


def test_shard_over_max_shard_bytes(tmp_path, keys, shard):
    from privdistill.identity import public_key_b64

    app = make_app(tmp_path, max_shard_bytes=4096)
    app.state.ledger.add_site(A, public_key_b64(keys[A]))
    _, manifest, sig = shard_files(shard)
    with TestClient(app) as client:
        r = start(client, keys[A], A, manifest, sig)
    _assert_refused(app, r, 413, "shard_too_large")
    assert count_rows(app, "uploads") == 0


# ----------------------------------------------------------------------------- chunk checks
def test_chunk_over_max_chunk_bytes(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    r = call(client, keys[A], A, "PATCH", f"/v1/uploads/{up['upload_id']}", tar[:CHUNK + 1], {"Upload-Offset": "0"})
    _assert_refused(app, r, 413, "request_too_large")
    assert app.state.ledger.upload(up["upload_id"]).offset == 0


def test_chunk_past_declared_size(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    send_all(client, keys[A], A, up["upload_id"], tar[:-10])
    r = call(client, keys[A], A, "PATCH", f"/v1/uploads/{up['upload_id']}", tar[-10:] + b"extra",
             {"Upload-Offset": str(len(tar) - 10)})
    assert (r.status_code, r.json()["error"]) == (413, "request_too_large")
    assert staging_path(app.state.config.state_dir, up["upload_id"]).stat().st_size == len(tar) - 10
    assert app.state.ledger.accepted_shards() == []


def test_wrong_offset_409_returns_current(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    send_all(client, keys[A], A, up["upload_id"], tar[:CHUNK])
    r = call(client, keys[A], A, "PATCH", f"/v1/uploads/{up['upload_id']}", tar[:CHUNK], {"Upload-Offset": "0"})
    assert r.status_code == 409
    assert r.json()["error"] == "offset_mismatch" and r.json()["offset"] == CHUNK
    assert r.headers["Upload-Offset"] == str(CHUNK)
    assert metric(app, "privdistill_requests_rejected_total", "offset_mismatch") == 1
    assert staging_path(app.state.config.state_dir, up["upload_id"]).stat().st_size == CHUNK
    assert app.state.ledger.upload(up["upload_id"]).offset == 0  # durable offset: fsync'd in groups
    assert app.state.ledger.accepted_shards() == []


def test_missing_upload_offset_header_is_400(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    r = call(client, keys[A], A, "PATCH", f"/v1/uploads/{up['upload_id']}", tar[:10])
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")


def test_other_site_cannot_see_or_patch_an_upload(env, keys, shard):
    app, client = env
    tar, manifest, sig = shard_files(shard)
    up = start(client, keys[A], A, manifest, sig).json()
    path = f"/v1/uploads/{up['upload_id']}"
    for method, body, headers in (("GET", b"", {}), ("HEAD", b"", {}), ("PATCH", tar[:100], {"Upload-Offset": "0"})):
        r = call(client, keys[B], B, method, path, body, headers)
        assert r.status_code == 404, method
        if method != "HEAD":
            assert r.json()["error"] == "unknown_upload"
    assert not staging_path(app.state.config.state_dir, up["upload_id"]).exists()
    assert call(client, keys[A], A, "GET", "/v1/uploads/" + "0" * 32).status_code == 404


# ----------------------------------------------------------------------------- tar content checks
def _sample(i: int) -> list[tuple[str, bytes]]:
    key = f"t_{i:06d}"
    png = encode_png(np.full((1, 4, 4), 0.5 * (i % 2), np.float32))
    meta = {"sample_id": key, "label": 0, "class_name": "cat", "prompt": None}
    return [(f"{key}.png", png), (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]


def _tar(members: list[tuple[str, bytes]], *, uname: str = "", tail: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uname = len(data), 0, uname
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue() + tail


def _crafted(key, tar_members, manifest_members, sample_count: int, **tar_kw) -> tuple[bytes, bytes, str]:
    """A tar with exactly ``tar_members`` and a correctly signed manifest whose size/sha match that tar."""
    tar = _tar(tar_members, **tar_kw)
    m = Manifest(site_id=A, shard_id="t", created="2025-01-01T00:00:00+00:00", software_version="test",
                 config_hash="0" * 64, sample_count=sample_count, tar_sha256=sha256_bytes(tar), tar_size=len(tar),
                 resolution=4, channels=1, members={n: sha256_bytes(d) for n, d in manifest_members},
                 conditioning=Conditioning(type="class", class_names=["cat"]), privacy={})
    body = m.to_bytes()
    return tar, body, sign(key, body)


def _cases():
    good = _sample(0) + _sample(1)
    png0, json0 = good[0], good[1]
    text_png = ("t_000000.png", b"this is really text")
    tampered = ("t_000000.png", png0[1][:-4] + b"\0\0\0\0")
    return {
        "absolute_path": ([("/t_000000.png", png0[1])] + good[1:], good, 2, "unsafe_member_name"),
        "dotdot": ([("../t_000000.png", png0[1])] + good[1:], good, 2, "unsafe_member_name"),
        "duplicate": ([png0, png0, json0], [png0, json0], 1, "duplicate_member"),
        "txt_member": ([("t_000000.txt", b"hello")] + good[1:], good, 2, "non_png_member"),
        "png_that_is_text": ([text_png, json0], [text_png, json0], 1, "non_png_member"),
        "member_hash_differs": ([tampered, json0], [png0, json0], 1, "hash_mismatch"),
    }


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.lru_cache(maxsize=1)
def _png_bomb(side: int = 13000) -> bytes:
    """A valid 13000x13000 grayscale PNG of ~170 KB: decoding it would need ~170 MB (2.2 GB through PIL RGB).
    One deflate block of 100 zero rows, byte-aligned by a full flush, repeated: no 170 MB compression here."""
    rows = 100
    chunk = b"\0" * ((side + 1) * rows)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(chunk) + co.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(side // rows):
        adler = zlib.adler32(chunk, adler)
    idat = b"\x78\xda" + block * (side // rows) + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _with_text_chunk(png: bytes) -> bytes:
    """A tEXt chunk (free text riding along in image metadata) before IEND."""
    return png[:-12] + _png_chunk(b"tEXt", b"Comment\0Ivanov Ivan, 1957-03-02") + png[-12:]


def _json(key: str, **changes) -> bytes:
    meta = {"sample_id": key, "label": 0, "class_name": "cat", "prompt": None} | changes
    return json.dumps(meta, sort_keys=True).encode()


def _content_cases():
    """The content checks: every byte of a shard must be what the packager writes for its samples."""
    good = _sample(0) + _sample(1)
    png0 = good[0]

    def swap(i: int, data: bytes) -> list[tuple[str, bytes]]:
        out = list(good)
        out[i] = (out[i][0], data)
        return out

    bomb, text_png = swap(0, _png_bomb()), swap(0, _with_text_chunk(png0[1]))
    after_iend = swap(0, png0[1] + b"Ivanov Ivan")
    big = swap(0, encode_png(np.zeros((1, 8, 8), np.float32)))
    rgb = swap(0, encode_png(np.zeros((3, 4, 4), np.float32)))
    free_class = swap(1, _json("t_000000", class_name="Ivanov Ivan Petrovich"))
    free_id = swap(1, _json("t_000000", sample_id="ivanov-ivan-1957"))
    extra_key = swap(1, json.dumps({"sample_id": "t_000000", "label": 0, "class_name": "cat", "prompt": None,
                                    "note": "x"}, sort_keys=True).encode())
    spaced = swap(1, json.dumps({"sample_id": "t_000000", "label": 0, "class_name": "cat", "prompt": None},
                                sort_keys=True, indent=1).encode())
    out_of_order = [good[2], good[3], good[0], good[1]]
    return {
        "trailing_bytes": (good, good, 2, "non_canonical_tar", {"tail": b"Ivanov Ivan" + b"\0" * 501}),
        "tar_uname": (good, good, 2, "non_canonical_tar", {"uname": "ivanov"}),
        "png_bomb": (bomb, bomb, 2, "png_size_mismatch", {}),
        "png_other_size": (big, big, 2, "png_size_mismatch", {}),
        "png_rgb_in_gray_shard": (rgb, rgb, 2, "invalid_png", {}),
        "png_text_chunk": (text_png, text_png, 2, "png_extra_chunk", {}),
        "png_bytes_after_iend": (after_iend, after_iend, 2, "png_extra_chunk", {}),
        "class_name_free_text": (free_class, free_class, 2, "malformed_sample", {}),
        "sample_id_not_the_key": (free_id, free_id, 2, "malformed_sample", {}),
        "json_unknown_key": (extra_key, extra_key, 2, "malformed_sample", {}),
        "json_not_canonical": (spaced, spaced, 2, "malformed_sample", {}),
        "members_out_of_order": (out_of_order, good, 2, "non_canonical_tar", {}),
    }


def _all_cases():
    return {**{k: (*v, {}) for k, v in _cases().items()}, **_content_cases()}


CONTENT_CASES = ("trailing_bytes", "tar_uname", "png_bomb", "png_other_size", "png_rgb_in_gray_shard", "png_text_chunk",
                 "png_bytes_after_iend", "class_name_free_text", "sample_id_not_the_key", "json_unknown_key",
                 "json_not_canonical", "members_out_of_order")


def test_content_case_names_are_complete():
    assert sorted(_content_cases()) == sorted(CONTENT_CASES)


@pytest.mark.parametrize("case", sorted(_cases()) + list(CONTENT_CASES))
def test_tar_content_rejected_after_last_chunk(env, keys, case, monkeypatch):
    app, client = env
    tar_members, manifest_members, n, reason, tar_kw = _all_cases()[case]
    tar, manifest, sig = _crafted(keys[A], tar_members, manifest_members, n, **tar_kw)
    from PIL import Image

    def no_decoding(*a, **kw):
        raise AssertionError("a PNG was decoded before its header was checked")

    monkeypatch.setattr(Image, "open", no_decoding)  # verification never hands a PNG to PIL
    r = start(client, keys[A], A, manifest, sig)
    assert r.status_code == 201, r.text  # the manifest itself is fine: only the tar check may fail
    up = r.json()
    last = send_all(client, keys[A], A, up["upload_id"], tar, chunk=1024 if len(tar) < 16384 else CHUNK)
    assert last.status_code == 204
    assert (last.headers["Upload-State"], last.headers["Upload-Reason"]) == ("rejected", reason)
    got = call(client, keys[A], A, "GET", f"/v1/uploads/{up['upload_id']}").json()
    assert (got["state"], got["reason"]) == ("rejected", reason)
    assert metric(app, "privdistill_shards_rejected_total", reason) == 1
    assert metric(app, "privdistill_shards_accepted_total") == 0
    assert_nothing_stored(app)
    audit = [json.loads(x) for x in (app.state.config.state_dir / "audit.log").read_text().splitlines()]
    assert (audit[-1]["event"], audit[-1]["reason"]) == ("rejected", reason)


# ----------------------------------------------------------------------------- ops endpoints
def test_healthz_metrics_openapi(env, keys, shard):
    app, client = env
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["version"]
    start(client, keys["other"], "nobody", b"{}", "x")
    text = client.get("/metrics").text
    assert 'privdistill_requests_rejected_total{reason="bad_signature"} 1.0' in text  # no unknown_site
    for name in ("privdistill_uploads_created_total", "privdistill_upload_bytes_total",
                 "privdistill_shards_accepted_total"):
        assert f"{name} 0.0" in text
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]["/v1/uploads"]) == {"post"}
    assert set(spec["paths"]["/v1/uploads/{upload_id}"]) == {"head", "get", "patch"}
    post = spec["paths"]["/v1/uploads"]["post"]["responses"]
    assert {"200", "201", "400", "401", "403", "413", "422"} <= set(post)
    assert "409" in spec["paths"]["/v1/uploads/{upload_id}"]["patch"]["responses"]
    assert client.get("/nope").json()["error"] == "not_found"
