"""PACS source without a server: config validation, multipart parsing, tag whitelisting, error mapping and
retries against an in-process fake (httpx.MockTransport). The real-Orthanc scenarios are in e2e/test_orthanc.py."""

from __future__ import annotations

import dataclasses
import email.policy
import json
import re
import socket
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from pathlib import Path

import httpx
import numpy as np
import pytest
from _orthanc import dicom_bytes
from structlog.testing import capture_logs

from privdistill.config import PacsSource, parse_config
from privdistill.data import pacs
from privdistill.data.pacs import parse_instance, parse_multipart_related, probe, read_pacs
from privdistill.data.sources import RawRecord, Skipped, read_source
from privdistill.errors import ConfigError, DataError, RetryableNetworkError

PHI = {"PatientName": "Fakename^Unit", "PatientBirthDate": "19610203", "InstitutionName": "Saint Unittest Clinic",
       "ReferringPhysicianName": "Doctor^Nobody", "AccessionNumber": "ACC4242"}
PHI_STRINGS = ["Fakename", "19610203", "Saint Unittest", "Nobody", "ACC4242", "1.2.3.4.555"]


def _pw(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "pacs_password"
    path.write_text("secret-pw\n")
    path.chmod(mode)
    return path


def _cfg(source: dict, tmp_path: Path) -> dict:
    return {"data": {"source": {"type": "pacs", "url": "http://127.0.0.1:8042", **source}}}


def _problems(raw: dict, base: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "site.yaml", base)
    return err.value.problems


def _img(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)


def _instance(seed: int, pid: str = "P1", label: str = "Bag", **kw: object) -> bytes:
    return dicom_bytes(_img(seed), patient_id=pid, study_uid="1.2.3.4.555", series_uid="1.2.3.4.556",
                       label=label, phi=PHI, **kw)  # type: ignore[arg-type]  # each test passes its own keywords


def _src(tmp_path: Path, **over: object) -> PacsSource:
    base = {"type": "pacs", "url": "http://pacs.test:8042", "label_tag": "StudyDescription",
            "credentials": {"username": "u", "password_file": _pw(tmp_path)}, "timeout_s": 2}
    return PacsSource.model_validate({**base, **over})


# ----------------------------------------------------------------------------- config
def test_config_parses_and_resolves_password_file_relative_to_the_yaml(tmp_path: Path) -> None:
    _pw(tmp_path)
    raw = _cfg({"credentials": {"username": "agent", "password_file": "pacs_password"},
                "query": {"Modality": "OT", "StudyDescription": "Bag*"}, "label_tag": "StudyDescription",
                "api": "dicomweb", "dicomweb_root": "/dicom-web/", "url": "https://pacs.local:8043/"}, tmp_path)
    src = parse_config(raw, "site.yaml", tmp_path).data.source
    assert isinstance(src, PacsSource)
    assert src.credentials is not None and src.credentials.password_file == tmp_path / "pacs_password"
    assert (src.url, src.dicomweb_root, src.patient_id_tag) == ("https://pacs.local:8043", "/dicom-web", "PatientID")


def test_inline_password_is_refused_with_the_way_to_fix_it(tmp_path: Path) -> None:
    problems = _problems(_cfg({"credentials": {"username": "u", "password": "hunter2"}}, tmp_path), tmp_path)
    assert len(problems) == 1 and "password_file" in problems[0] and "inline" in problems[0]
    assert "hunter2" not in problems[0]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_group_or_world_readable_password_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = _pw(tmp_path, mode)
    problems = _problems(_cfg({"credentials": {"username": "u", "password_file": str(path)}}, tmp_path), tmp_path)
    assert problems == [f"data.source.credentials.password_file: {path} is readable by group or others "
                        f"(mode {mode:04o}); run `chmod 600 {path}`"]


def test_missing_password_file_and_every_other_problem_listed_at_once(tmp_path: Path) -> None:
    raw = _cfg({"url": "ftp://pacs:21", "label_tag": "NotATag", "query": {"Modalty": "OT"}, "timeout_s": 0}, tmp_path)
    problems = _problems(raw, tmp_path)
    joined = "\n".join(problems)
    assert len(problems) == 4, problems
    for needle in ("data.source.url", "http(s)://", "'NotATag' is not a DICOM keyword", "['Modalty']",
                   "data.source.timeout_s"):
        assert needle in joined
    raw = _cfg({"credentials": {"username": "u", "password_file": "nope"}}, tmp_path)
    assert _problems(raw, tmp_path) == [
        f"data.source.credentials.password_file: file not found: {tmp_path / 'nope'} "
        "(write the PACS password there, then chmod 600 it)"]


@pytest.mark.parametrize("url,needle", [("http://user:pw@pacs:8042", "use data.source.credentials"),
                                        ("http://pacs:8042/?x=1", "query or fragment"), ("pacs:8042", "http(s)://")])
def test_bad_urls_are_refused(tmp_path: Path, url: str, needle: str) -> None:
    problems = _problems(_cfg({"url": url}, tmp_path), tmp_path)
    assert len(problems) == 1 and needle in problems[0] and "pw@" not in problems[0].split("input_value")[0]


# ----------------------------------------------------------------------------- multipart
def test_multipart_parses_parts_written_by_the_email_package() -> None:
    # the email generator rewrites bare CR/LF inside payloads, so these blobs hold none (see the next test)
    blobs = [b"\x00\x01DICM--not-the-boundary" + bytes(b for b in range(256) if b not in (10, 13)), b"second"]
    msg = MIMEMultipart("related", boundary="b0und4ry-xyz")
    for b in blobs:
        msg.attach(MIMEApplication(b, "dicom", _encoder=lambda m: None))
    wire = msg.as_bytes(policy=email.policy.HTTP)
    body = wire.split(b"\r\n\r\n", 1)[1]  # the HTTP body is what follows the top-level headers
    assert parse_multipart_related(body, msg["Content-Type"]) == blobs


def test_multipart_handles_preamble_quoted_boundary_and_headerless_parts() -> None:
    first = b"a\r\n\r\nb\n\rc\r\n--Xy\r\n"  # line ends and a boundary prefix inside binary content
    body = (b"preamble\r\n--XyZ\r\n\r\n" + first + b"\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\n"
            b"second\r\n--XyZ--\r\nepilogue")
    ct = 'multipart/related; type="application/dicom"; boundary="XyZ"'
    assert parse_multipart_related(body, ct) == [first, b"second"]


@pytest.mark.parametrize("body,ct,needle", [
    (b"--XyZ\r\n\r\ntruncated", "multipart/related; boundary=XyZ", "closing boundary"),
    (b"--XyZ\r\n\r\nx\r\n--XyZ--", "application/dicom", "not a multipart"),
    (b"--XyZ\r\n\r\nx\r\n--XyZ--", "multipart/related", "not a multipart"),
    (b"no delimiter here", "multipart/related; boundary=XyZ", "not found"),
])
def test_multipart_malformed_answers_raise(body: bytes, ct: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_multipart_related(body, ct)


# ----------------------------------------------------------------------------- tag whitelist
def test_parsed_instance_keeps_only_pixels_label_and_patient_id(tmp_path: Path) -> None:
    rec = parse_instance(_instance(1, pid="P0042"), "pacs instance 1/1", _src(tmp_path))
    assert isinstance(rec, RawRecord)
    np.testing.assert_array_equal(rec.image, _img(1).astype(np.float32))
    assert (rec.label, rec.patient_id, rec.prompt, rec.ref) == ("Bag", "P0042", None, "pacs instance 1/1")
    text = repr([getattr(rec, f) for f in rec.__slots__ if f != "image"])
    assert not [s for s in PHI_STRINGS if s in text]


def test_instance_without_pixels_or_with_corrupt_pixels_is_skipped(tmp_path: Path) -> None:
    src = _src(tmp_path)
    no_px = dicom_bytes(None, patient_id="P1", study_uid="1.2", series_uid="1.3", label="Bag")
    short = dicom_bytes(None, patient_id="P1", study_uid="1.2", series_uid="1.3", label="Bag", pixel_bytes=b"\x01" * 10)
    truncated = _instance(1)[:-20]  # the transfer was cut inside the pixel data
    got = [parse_instance(b, "r", src) for b in (no_px, short, b"garbage" * 30, truncated)]
    assert [g.reason for g in got if isinstance(g, Skipped)] == [
        "no_pixel_data", "bad_pixel_data", "not_dicom", "bad_pixel_data"]


# ----------------------------------------------------------------------------- fake server
class FakeOrthanc:
    """Orthanc's /system, /tools/find and /instances/{id}/file, plus DICOMweb QIDO/WADO, with injectable faults."""

    def __init__(self, instances: dict[str, bytes], *, fail: dict[str, list[int]] | None = None,
                 server_limit: int | None = None) -> None:
        self.instances = instances
        self.server_limit = server_limit  # like Orthanc's LimitFindInstances: answers capped below the asked Limit
        self.fail = fail or {}  # path prefix -> status codes to answer first, in order
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(path)
        for prefix, codes in self.fail.items():
            if path.startswith(prefix) and codes:
                return httpx.Response(codes.pop(0), json={"Message": "injected"})
        if request.headers.get("authorization") != httpx.BasicAuth("u", "secret-pw")._auth_header:
            return httpx.Response(401)
        if path == "/system":
            return httpx.Response(200, json={"Version": "9.9.9", "Name": "fake"})
        if path == "/tools/find":
            q = json.loads(request.content)
            limit = min(q["Limit"], self.server_limit or q["Limit"])
            ids = sorted(self.instances)[q["Since"]: q["Since"] + limit]
            return httpx.Response(200, json=ids)
        m = re.fullmatch(r"/instances/([^/]+)/file", path)
        if m:
            blob = self.instances.get(m.group(1))
            return httpx.Response(200, content=blob) if blob is not None else httpx.Response(404)
        if path == "/dicom-web/instances":
            uid = {"Value": ["1.2.3.4.555"], "vr": "UI"}
            offset, limit = int(request.url.params["offset"]), int(request.url.params["limit"])
            return httpx.Response(200, json=[{"0020000D": uid, "0020000E": uid,
                                              "00080018": {"Value": [k], "vr": "UI"},
                                              "00100010": {"Value": [{"Alphabetic": "Fakename^Qido"}]}}
                                             for k in sorted(self.instances)[offset: offset + limit]])
        m = re.fullmatch(r"/dicom-web/studies/[^/]+/series/[^/]+/instances/([^/]+)", path)
        if m and m.group(1) in self.instances:
            body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + self.instances[m.group(1)] + b"\r\n--B--\r\n"
            return httpx.Response(200, content=body,
                                  headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
        return httpx.Response(404, json={"Message": "Unknown resource"})


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacs, "BACKOFF_S", 0.0)


@pytest.mark.parametrize("api", ["orthanc", "dicomweb"])
def test_read_pacs_records_skips_and_logs_without_phi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      api: str) -> None:
    monkeypatch.setattr(pacs, "PAGE_SIZE", 2)  # forces three find pages
    fake = FakeOrthanc({"a1": _instance(1, "P1", "Bag"), "b2": _instance(2, "P2", "Coat"),
                        "c3": dicom_bytes(None, patient_id="P3", study_uid="1.2", series_uid="1.3", label="Bag"),
                        "d4": b"not dicom at all" * 20, "e5": _instance(5, "P5", "Bag")})
    with capture_logs() as logs:
        raw = read_pacs(_src(tmp_path, api=api), transport=httpx.MockTransport(fake))
    assert (raw.kind, raw.seen, raw.has_patient_ids, raw.has_labels) == ("pacs", 5, True, True)
    assert [(r.patient_id, r.label) for r in raw.records] == [("P1", "Bag"), ("P2", "Coat"), ("P5", "Bag")]
    np.testing.assert_array_equal(raw.records[2].image, _img(5).astype(np.float32))
    assert [(s.ref, s.reason) for s in raw.skipped] == [("pacs instance 3/5", "no_pixel_data"),
                                                        ("pacs instance 4/5", "not_dicom")]
    everything = json.dumps([logs, [dataclasses.asdict(s) for s in raw.skipped],
                             [[r.label, r.patient_id, r.ref, r.prompt] for r in raw.records]], default=str)
    assert not [s for s in [*PHI_STRINGS, "Qido", "a1", "b2", "e5"] if s in everything]
    info = json.dumps([e for e in logs if e["log_level"] != "debug"], default=str)
    assert "P1" not in info and "P5" not in info


def test_max_instances_caps_the_search(tmp_path: Path) -> None:
    fake = FakeOrthanc({f"i{k}": _instance(k, f"P{k}") for k in range(4)})
    raw = read_pacs(_src(tmp_path, max_instances=2), transport=httpx.MockTransport(fake))
    assert [r.patient_id for r in raw.records] == ["P0", "P1"] and raw.seen == 2


def test_transient_errors_are_retried_then_succeed(tmp_path: Path) -> None:
    fake = FakeOrthanc({"a1": _instance(1)}, fail={"/instances/a1": [503, 502], "/tools/find": [500]})
    raw = read_pacs(_src(tmp_path), transport=httpx.MockTransport(fake))
    assert len(raw.records) == 1
    # the failed search, its retry, and the empty page that ends the listing
    assert fake.calls.count("/instances/a1/file") == 3 and fake.calls.count("/tools/find") == 3


def test_a_server_capping_its_answers_below_the_page_size_is_paged_to_the_end(tmp_path: Path) -> None:
    fake = FakeOrthanc({f"i{n:02d}": _instance(n) for n in range(7)}, server_limit=3)

    raw = read_pacs(_src(tmp_path), transport=httpx.MockTransport(fake))

    assert len(raw.records) == 7 and fake.calls.count("/tools/find") == 4  # 3 + 3 + 1, then an empty page


def test_one_instance_failing_persistently_is_skipped_after_three_tries(tmp_path: Path) -> None:
    fake = FakeOrthanc({"a1": _instance(1), "b2": _instance(2), "c3": _instance(3)},
                       fail={"/instances/b2": [503] * 5, "/instances/c3": [406]})

    raw = read_pacs(_src(tmp_path), transport=httpx.MockTransport(fake))

    assert len(raw.records) == 1
    assert sorted(k.reason for k in raw.skipped) == ["download_failed", "download_refused"]
    assert fake.calls.count("/instances/b2/file") == pacs.TRIES == 3


def test_a_server_failing_every_download_stops_the_run_with_a_retryable_error(tmp_path: Path) -> None:
    ids = [f"i{n}" for n in range(8)]
    fake = FakeOrthanc({i: _instance(n) for n, i in enumerate(ids)}, fail={f"/instances/{i}": [503] * 5 for i in ids})

    with pytest.raises(RetryableNetworkError, match=r"http://pacs.test:8042 answered HTTP 503.*injected"):
        read_pacs(_src(tmp_path), transport=httpx.MockTransport(fake))

    # it stops after MAX_CONSECUTIVE_FAILURES instances instead of trying all eight
    tried = {c for c in fake.calls if c.endswith("/file")}
    assert len(tried) == pacs.MAX_CONSECUTIVE_FAILURES == 5


def test_instance_deleted_after_the_search_is_skipped(tmp_path: Path) -> None:
    fake = FakeOrthanc({"a1": _instance(1), "b2": _instance(2)}, fail={"/instances/b2": [404]})
    raw = read_pacs(_src(tmp_path), transport=httpx.MockTransport(fake))
    assert len(raw.records) == 1 and [s.reason for s in raw.skipped] == ["instance_gone"]


def test_refused_credentials_are_a_config_error(tmp_path: Path) -> None:
    src = _src(tmp_path)
    src.credentials.password_file.write_text("wrong\n")  # type: ignore[union-attr]  # _src sets credentials
    with pytest.raises(ConfigError, match=r"refused the credentials.*HTTP 401.*password_file") as err:
        read_pacs(src, transport=httpx.MockTransport(FakeOrthanc({})))
    assert "wrong" not in str(err.value)


def test_missing_dicomweb_plugin_says_so(tmp_path: Path) -> None:
    fake = FakeOrthanc({}, fail={"/dicom-web": [404] * 9})
    for fn in (read_pacs, probe):
        with pytest.raises(DataError, match="DICOMweb plugin is not enabled"):
            fn(_src(tmp_path, api="dicomweb"), transport=httpx.MockTransport(fake))


def test_probe_reports_version_and_count(tmp_path: Path) -> None:
    fake = FakeOrthanc({f"i{k}": b"" for k in range(3)})
    info = probe(_src(tmp_path), transport=httpx.MockTransport(fake))
    assert {k: info[k] for k in ("reachable", "server", "version", "matching_instances", "matching_capped")} == {
        "reachable": True, "server": "Orthanc", "version": "9.9.9", "matching_instances": 3, "matching_capped": False}


def test_connection_refused_is_retryable_and_names_the_url_only(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    src = _src(tmp_path, url=f"http://127.0.0.1:{port}")
    with pytest.raises(RetryableNetworkError) as err:
        read_source(src)
    msg = str(err.value)
    assert f"http://127.0.0.1:{port}" in msg and "unreachable" in msg and "secret-pw" not in msg
    assert err.value.exit_code == 6
