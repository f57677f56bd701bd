"""The PACS source against a real Orthanc (REST and DICOMweb plugin) on loopback: images, labels and patient
ids exactly as stored, query filters, paging, malformed instances skipped, no PHI in records, work directory
or logs after a real ingest run, refused credentials, a missing DICOMweb root, and a stopped server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from _orthanc import (
    CLASS_NAMES,
    FMNIST,
    LABEL_TAG,
    Orthanc,
    Seeded,
    TlsFront,
    dicom_bytes,
    dicomweb_plugin,
    orthanc_binary,
    seed,
)
from _require import missing

from privdistill.config import PacsSource
from privdistill.data import pacs
from privdistill.data.pacs import probe, read_pacs
from privdistill.data.sources import RawSource, read_source
from privdistill.errors import ConfigError, DataError, RetryableNetworkError

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [1, 7, 8]  # Trouser, Sneaker, Bag
PATIENTS, VISITS, PER_VISIT = 6, 3, 2

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _need_orthanc() -> None:
    if orthanc_binary() is None or dicomweb_plugin() is None:
        missing("Orthanc with the DICOMweb plugin", "apt-get install orthanc orthanc-dicomweb")
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        missing("Fashion-MNIST", "apt-get install dataset-fashion-mnist (make data)")


class Server:
    def __init__(self, orthanc: Orthanc, seeded: Seeded, password_file: Path) -> None:
        self.orthanc, self.seeded, self.password_file = orthanc, seeded, password_file

    def source(self, **over: object) -> PacsSource:
        raw = {"type": "pacs", "url": self.orthanc.url, "label_tag": LABEL_TAG, "class_names": CLASS_NAMES,
               "credentials": {"username": self.orthanc.username, "password_file": str(self.password_file)},
               "query": {"Modality": "OT"}, "timeout_s": 10}
        return PacsSource.model_validate({**raw, **over})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _need_orthanc()
    root = tmp_path_factory.mktemp("orthanc")
    orthanc = Orthanc(root / "server").start()
    try:
        seeded = seed(orthanc, patients=PATIENTS, visits=VISITS, images_per_visit=PER_VISIT, classes=CLASSES,
                      other_modality_every=5)
        # valid DICOM that Orthanc stores, but that no pipeline can use: no pixels / too few pixel bytes
        for n, pixel_bytes in enumerate((None, b"\x07" * 10)):
            orthanc.upload(dicom_bytes(None, patient_id="P0001", study_uid=f"1.2.826.0.1.99.{n}",
                                       series_uid=f"1.2.826.0.1.98.{n}", label="Bag", pixel_bytes=pixel_bytes,
                                       phi={"PatientName": "Fakename^Broken"}))
        pw = root / "pacs_password"
        pw.write_text(orthanc.password + "\n")
        pw.chmod(0o600)
        yield Server(orthanc, seeded, pw)
    finally:
        orthanc.stop()


def _expected(s: Seeded, keep: Callable[..., bool]) -> dict[bytes, tuple[int, str]]:
    return {img.tobytes(): (lab, pid) for img, lab, pid, mod in zip(s.images, s.labels, s.patient_ids, s.modalities,
                                                                  strict=True) if keep(lab, pid, mod)}


def _got(raw: RawSource) -> dict[bytes, tuple[int, str]]:
    out = {}
    for r in raw.records:
        assert r.image.dtype == np.float32 and r.image.shape == (28, 28)
        out[r.image.astype(np.uint8).tobytes()] = (CLASS_NAMES.index(r.label), r.patient_id)
        np.testing.assert_array_equal(r.image.astype(np.uint8).astype(np.float32), r.image)  # integral, unscaled
    return out


@pytest.mark.parametrize("api", ["orthanc", "dicomweb"])
def test_both_apis_return_the_stored_images_labels_and_patients(server: Server, api: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacs, "PAGE_SIZE", 7)  # several find pages against the real server
    raw = read_source(server.source(api=api))
    want = _expected(server.seeded, lambda lab, pid, mod: mod == "OT")
    n_ot = sum(m == "OT" for m in server.seeded.modalities)
    assert len(want) == n_ot == len(server.seeded.images) - 6  # 3 of 18 studies are MR, 2 images each
    assert raw.seen == n_ot + 2 and len(raw.records) == n_ot
    assert _got(raw) == want
    assert len({r.patient_id for r in raw.records}) == PATIENTS
    assert Counter(s.reason for s in raw.skipped) == {"no_pixel_data": 1, "bad_pixel_data": 1}


@pytest.mark.parametrize("api", ["orthanc", "dicomweb"])
def test_query_selects_by_study_description_and_patient(server: Server, api: str) -> None:
    bags = read_pacs(server.source(api=api, query={"Modality": "OT", "StudyDescription": "Bag"}))
    assert _got(bags) == _expected(server.seeded, lambda lab, pid, mod: mod == "OT" and lab == 8) != {}
    assert len(bags.skipped) == 2  # the two broken instances are labelled Bag too
    one = read_pacs(server.source(api=api, query={"PatientID": "P0002"}))
    assert _got(one) == _expected(server.seeded, lambda lab, pid, mod: pid == "P0002")
    assert "MR" in {m for m, p in zip(server.seeded.modalities, server.seeded.patient_ids, strict=True)
                    if p == "P0002"}  # so the Modality key really was dropped from this query
    capped = read_pacs(server.source(api=api, max_instances=5))
    assert capped.seen == 5 and len(capped.records) + len(capped.skipped) == 5


def test_probe_reports_the_server_and_the_matching_count(server: Server) -> None:
    info = probe(server.source())
    n = sum(m == "OT" for m in server.seeded.modalities) + 2
    assert (info["server"], info["name"], info["matching_instances"]) == ("Orthanc", "privdistill-test", n)
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"]), info
    web = probe(server.source(api="dicomweb"))
    assert web["matching_instances"] == n and web["reachable"] is True


def test_ingest_stage_keeps_phi_out_of_the_workdir_and_logs(server: Server, tmp_path: Path) -> None:
    cfg = {
        "name": "pacs-ingest", "seed": 0,
        "data": {"source": {"type": "pacs", "url": server.orthanc.url, "api": "dicomweb", "label_tag": LABEL_TAG,
                            "class_names": CLASS_NAMES, "query": {"Modality": "OT"},
                            "credentials": {"username": server.orthanc.username,
                                            "password_file": str(server.password_file)}},
                 "classes": CLASSES, "resolution": 16, "test_fraction": 0.34},
        "teacher": {"model": {"block_out_channels": [16, 32], "norm_num_groups": 8}},
    }
    path = tmp_path / "pacs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "privdistill.cli", "--log-format", "json", "ingest", str(path),
                           "--workdir", str(work)], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "ingest" / "data_report.json").read_text())
    assert report["n_train"] + report["n_test"] == sum(m == "OT" for m in server.seeded.modalities)
    assert report["n_patients_train"] + report["n_patients_test"] == PATIENTS
    assert report["source"]["skipped_by_reason"] == {"bad_pixel_data": 1, "no_pixel_data": 1}
    assert report["class_names"] == ["Trouser", "Sneaker", "Bag"]
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "data.pacs.found" for e in events)
    # Assert: no fake name, birth date, institution, accession number or UID anywhere; no patient id in logs
    secrets = [*server.seeded.phi_strings, "Fakename", "Saint Nowhere", *server.seeded.orthanc_ids]
    blobs = {p.relative_to(work).as_posix(): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert "ingest/train.npz" in blobs and "config.resolved.json" in blobs
    for name, blob in {**blobs, "<logs>": (proc.stdout + proc.stderr).encode()}.items():
        leaked = [s for s in secrets if s.encode() in blob or s.encode("utf-32-le") in blob]
        assert not leaked, f"{name} holds {leaked[:3]}"
    assert not [p for p in set(server.seeded.patient_ids) if p in proc.stdout + proc.stderr]
    assert server.orthanc.password not in "".join(b.decode("latin-1") for b in blobs.values())


def test_doctor_checks_the_pacs_and_fails_a_query_that_matches_nothing(server: Server) -> None:
    from site_agent.doctor import check_data_source

    ok = check_data_source(server.source(), 5.0)
    none = check_data_source(server.source(query={"Modality": "MRR"}), 5.0)

    seeded_ot = sum(m == "OT" for m in server.seeded.modalities)
    assert ok.status == "ok" and ok.details["matching_instances"] == seeded_ot + 2  # + the two pixel-less instances
    assert none.status == "fail" and "no instance matches" in none.message and "Modality" in none.message


def test_new_studies_on_the_pacs_change_the_ingest_fingerprint(server: Server) -> None:
    from privdistill.config import parse_config
    from privdistill.pipeline import source_fingerprint

    cfg = parse_config({"data": {"source": server.source(api="orthanc").model_dump(mode="json")}})
    before = source_fingerprint(cfg)
    assert source_fingerprint(cfg) == before  # stable while the PACS does not change

    added = server.orthanc.upload(dicom_bytes(np.zeros((28, 28), np.uint8), patient_id="P-NEW",
                                              study_uid="1.2.826.0.1.97.1", series_uid="1.2.826.0.1.96.1",
                                              label="Bag"))
    try:
        assert source_fingerprint(cfg) != before  # a new study re-runs ingest
    finally:
        server.orthanc._http.delete(f"/instances/{added}").raise_for_status()
    assert source_fingerprint(cfg) == before


def test_wrong_password_is_a_config_error(server: Server, tmp_path: Path) -> None:
    bad = tmp_path / "pw"
    bad.write_text("not-the-password\n")
    bad.chmod(0o600)
    src = server.source(credentials={"username": server.orthanc.username, "password_file": str(bad)})
    with pytest.raises(ConfigError, match=r"refused the credentials .*HTTP 401.*check username and password_file"):
        read_pacs(src)
    with pytest.raises(ConfigError, match=r"requires credentials .*HTTP 401.*set credentials"):
        read_pacs(server.source(credentials=None))


def test_wrong_dicomweb_root_says_the_plugin_is_not_enabled(server: Server) -> None:
    with pytest.raises(DataError, match=r"/not-dicom-web \(HTTP 404\): the DICOMweb plugin is not enabled"):
        read_pacs(server.source(api="dicomweb", dicomweb_root="/not-dicom-web"))


def test_stopped_orthanc_is_a_retryable_network_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_orthanc()
    monkeypatch.setattr(pacs, "BACKOFF_S", 0.05)
    with Orthanc(tmp_path / "o") as orthanc:
        orthanc.upload(dicom_bytes(np.zeros((4, 4), np.uint8), patient_id="P1", study_uid="1.2.3.1",
                                   series_uid="1.2.3.2", label="Bag"))
        pw = tmp_path / "pw"
        pw.write_text(orthanc.password)
        pw.chmod(0o600)
        src = PacsSource(type="pacs", url=orthanc.url, credentials={"username": orthanc.username,
                                                                     "password_file": pw})
        assert len(read_pacs(src).records) == 1
    with pytest.raises(RetryableNetworkError) as err:
        read_pacs(src)
    assert f"the PACS at {orthanc.url} is unreachable (ConnectError)" in str(err.value)
    assert err.value.exit_code == 6 and orthanc.password not in str(err.value)


def test_https_with_ca_file_and_an_untrusted_certificate(server: Server, tmp_path: Path) -> None:
    with TlsFront(server.orthanc.port, tmp_path / "tls") as front:
        raw = read_pacs(server.source(url=front.url, ca_file=str(front.ca_file), query={"PatientID": "P0003"}))
        assert _got(raw) == _expected(server.seeded, lambda lab, pid, mod: pid == "P0003")
        with pytest.raises(ConfigError, match=r"data.source.ca_file: the TLS certificate of the PACS at "
                                              r"https://127.0.0.1:\d+ is not trusted .*set ca_file"):
            read_pacs(server.source(url=front.url))
