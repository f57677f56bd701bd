"""Schemathesis fuzzing of the coordinator API from its own OpenAPI schema: no input yields a server error,
and unsigned /v1 requests are always refused with a documented 4xx."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from coordinator.api import create_app
from coordinator.config import CoordinatorConfig
from privdistill.identity import generate_key, public_key_b64, sign, sign_request
from privdistill.shard import Conditioning, Manifest

# schemathesis' lazy fixture loader does not work with pytest 9, so the app lives in a module temp dir
_STATE = Path(tempfile.mkdtemp(prefix="privdistill-fuzz-"))
APP = create_app(CoordinatorConfig(tls={"cert": "x.pem", "key": "x.key"}, state_dir=_STATE / "state",
                                   limits={"max_chunk_bytes": 4096, "max_manifest_bytes": 4096}))
APP.state.ledger.add_site("site-a", public_key_b64(generate_key()))  # a registered name, key unknown to the fuzzer
KEY = generate_key()
APP.state.ledger.add_site("site-k", public_key_b64(KEY))  # signed fuzzing below
schemathesis.openapi.media_type("application/offset+octet-stream", st.binary(max_size=6000))  # PATCH chunks
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _cleanup_state():
    yield
    shutil.rmtree(_STATE, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_unsigned_v1_refused(case):
    response = case.call_and_validate(checks=[not_a_server_error])
    status = response.status_code
    if case.method.upper() != case.operation.method.upper():  # schemathesis also probes undeclared methods
        assert status == 405, (case.method, case.path, status)
    elif case.path.startswith("/v1/"):
        assert 400 <= status < 500, (case.method, case.path, status)
        if case.method.upper() != "HEAD":
            assert response.json()["error"] and response.json()["detail"]
    else:
        assert status == 200


def test_every_operation_was_fuzzed():
    ops = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    assert ops == {("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/uploads"),
                   ("HEAD", "/v1/uploads/{upload_id}"), ("GET", "/v1/uploads/{upload_id}"),
                   ("PATCH", "/v1/uploads/{upload_id}")}


# ----------------------------------------------------------------------------- signed garbage
_manifest_like = st.fixed_dictionaries({
    "site_id": st.sampled_from(["site-k", "site-a", ""]), "shard_id": st.text(max_size=8),
    "sample_count": st.integers(-2, 3), "tar_size": st.integers(-1, 1 << 40),
    "tar_sha256": st.sampled_from(["0" * 64, "zz"]), "members": st.dictionaries(st.text(max_size=12),
                                                                               st.text(max_size=64), max_size=3),
}).map(lambda d: json.dumps(d))
_bodies = st.one_of(
    st.binary(max_size=300),
    st.fixed_dictionaries({"manifest": st.one_of(st.text(max_size=200), _manifest_like),
                           "signature": st.text(max_size=100)}).map(lambda d: json.dumps(d).encode()),
    _manifest_like.map(lambda m: json.dumps({"manifest": m, "signature": sign(KEY, m.encode())}).encode()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies)
def test_signed_garbage_manifests_are_refused_never_500(body):
    with TestClient(APP) as client:
        r = client.post("/v1/uploads", content=body,
                        headers=sign_request(KEY, "site-k", "POST", "/v1/uploads", body, host="testserver"))
    assert r.status_code in (400, 413, 422), (body[:200], r.status_code, r.text)
    assert r.json()["error"]


_ascii = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(offset=st.one_of(st.integers(-5, 5000), _ascii), chunk=st.binary(max_size=5000),
       upload_id=st.sampled_from(["open", "0" * 32, "../x", "%2e%2e"]))
def test_signed_garbage_chunks_never_500(offset, chunk, upload_id):
    path = f"/v1/uploads/{_open_upload() if upload_id == 'open' else upload_id}"
    headers = sign_request(KEY, "site-k", "PATCH", path, chunk, host="testserver", upload_offset=str(offset))
    with TestClient(APP) as client:
        r = client.patch(path, content=chunk, headers=headers)
    assert r.status_code in (204, 400, 404, 409, 413), (path, offset, len(chunk), r.status_code, r.text)


_OPEN: list[str] = []


def _open_upload() -> str:
    """One real receiving upload of site-k (a 3000-byte declared tar that never verifies)."""
    if not _OPEN:
        m = Manifest(site_id="site-k", shard_id="f", created="2025-01-01T00:00:00+00:00", software_version="t",
                     config_hash="0" * 64, sample_count=1, tar_sha256="1" * 64, tar_size=3000,
                     resolution=8, channels=1,
                     members={"f_000000.png": "2" * 64, "f_000000.json": "3" * 64},
                     conditioning=Conditioning(type="none"), privacy={}).to_bytes()
        body = json.dumps({"manifest": m.decode(), "signature": sign(KEY, m)}).encode()
        with TestClient(APP) as client:
            headers = sign_request(KEY, "site-k", "POST", "/v1/uploads", body, host="testserver")
            r = client.post("/v1/uploads", content=body, headers=headers)
        assert r.status_code == 201, r.text
        _OPEN.append(r.json()["upload_id"])
    return _OPEN[0]
