"""A real Orthanc (with the DICOMweb plugin) on loopback for tests and the PACS demo, and a seeder that
stores Fashion-MNIST images as DICOM instances carrying fake patient names, birth dates and institutions."""

from __future__ import annotations

import gzip
import io
import json
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

FMNIST = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with `apt-get install orthanc orthanc-dicomweb` (Debian/Ubuntu)"
PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
CLASS_NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle-boot"]
# The label lives in StudyDescription (0008,1030): one visit (study) images one kind of garment.
LABEL_TAG = "StudyDescription"


def orthanc_binary() -> str | None:
    known = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
    return shutil.which("Orthanc") or next((p for p in known if Path(p).exists()), None)


def dicomweb_plugin() -> Path | None:
    found = [p for p in PLUGIN_PATHS if p.exists()] + sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return found[0] if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process: loopback only, HTTP basic auth, storage in ``root``, DICOM port disabled."""

    def __init__(self, root: Path, *, username: str = "privdistill", password: str = "pacs-test-password") -> None:
        binary, plugin = orthanc_binary(), dicomweb_plugin()
        if binary is None or plugin is None:
            what = "binary" if binary is None else "DICOMweb plugin"
            raise FileNotFoundError(f"Orthanc {what} not found; {INSTALL_HINT}")
        self.root, self.username, self.password = Path(root), username, password
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "Name": "privdistill-test",
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {username: password},
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config_path = self.root / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self._cmd = [binary, str(self.config_path)]
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._http: httpx.Client | None = None

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def start(self, timeout_s: float = 30) -> Orthanc:
        self._log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self._cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = (self.root / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode} at start:\n{tail}")
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer {self.url}/system within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def upload(self, blob: bytes) -> str:
        """POST one DICOM file to /instances; the Orthanc id of the stored instance."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.url, auth=self.auth, timeout=30)
        r = self._http.post("/instances", content=blob, headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        return r.json()["ID"]


class TlsFront:
    """HTTPS on 127.0.0.1 in front of a plain-HTTP server, the way nginx fronts an Orthanc: a test CA, a
    127.0.0.1 certificate, one thread per connection forwarding bytes. (Debian's Orthanc 1.10.1 crashes with
    SIGSEGV on the first request to its own HTTPS listener, SslEnabled, under OpenSSL 3.)"""

    def __init__(self, target_port: int, root: Path) -> None:
        from cryptography.hazmat.primitives import serialization

        from coordinator.provision import make_ca, make_server_cert

        ca_key, ca_cert = make_ca(2)
        key, cert = make_server_cert(ca_key, ca_cert, "127.0.0.1", 2)
        pem = serialization.Encoding.PEM
        root.mkdir(parents=True, exist_ok=True)
        self.ca_file = root / "pacs-ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(pem))
        (root / "tls.pem").write_bytes(cert.public_bytes(pem) + key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(root / "tls.pem")
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TlsFront:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # e.g. the client refused our certificate
            conn.close()
            return
        up = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        try:
            while not self._stop.is_set():
                ready = [tls] if tls.pending() else select.select([tls, up], [], [], 0.2)[0]
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (up if src is tls else tls).sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            tls.close()
            up.close()


# ----------------------------------------------------------------------------- DICOM instances
def dicom_bytes(
    pixels: np.ndarray | None,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    label: str | None,
    modality: str = "OT",
    phi: dict[str, str] | None = None,
    pixel_bytes: bytes | None = None,
) -> bytes:
    """A Secondary Capture instance (Explicit VR Little Endian). ``phi`` sets other tags (fake names etc.);
    ``pixels`` None with ``pixel_bytes`` None writes no PixelData; ``pixel_bytes`` overrides the pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient_id, study_uid, series_uid
    ds.Modality = modality
    if label is not None:
        ds.StudyDescription = label
    for keyword, value in (phi or {}).items():
        setattr(ds, keyword, value)
    rows, cols = (28, 28) if pixels is None else pixels.shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixel_bytes is not None:
        ds.PixelData = pixel_bytes
    elif pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels, np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def fashion_mnist(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n Fashion-MNIST training images (uint8 [n, 28, 28]) and labels."""
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images[start : start + n].copy(), labels[start : start + n].astype(np.int64)


@dataclass
class Seeded:
    """What was stored: per instance its pixels, class index, patient id and modality; the fake PHI strings."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    phi_strings: list[str] = field(default_factory=list)  # names, dates, institutions, UIDs: must never leak
    orthanc_ids: list[str] = field(default_factory=list)


def _acquisition(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A repeat acquisition of one object: shifted by up to 1 px, intensity within +/- 5 %."""
    dy, dx = (int(v) for v in rng.integers(-1, 2, 2))
    moved = np.roll(base.astype(np.float32), (dy, dx), axis=(0, 1)) * rng.uniform(0.95, 1.05)
    return np.clip(np.rint(moved), 0, 255).astype(np.uint8)


def seed(
    orthanc: Orthanc,
    *,
    patients: int,
    visits: int,
    images_per_visit: int = 2,
    classes: list[int] | None = None,
    other_modality_every: int = 0,
    acquisitions: bool = False,
    start: int = 0,
) -> Seeded:
    """Store ``patients`` x ``visits`` studies of ``images_per_visit`` Fashion-MNIST images each (label in
    StudyDescription, patient id P0001...), with fake PHI in other tags. Default: every image is a different
    garment and each visit one class (cycling over ``classes``). ``acquisitions``: each patient is one garment
    and every image a repeat acquisition of it (what re-identification needs). Every ``other_modality_every``-th
    study is Modality MR instead of OT (for query tests)."""
    wanted = classes if classes is not None else list(range(10))
    need = patients * (1 if acquisitions else visits * images_per_visit)
    pool, pool_labels = fashion_mnist(max(6000, 20 * need), start)
    by_class = {c: list(np.flatnonzero(pool_labels == c)) for c in wanted}
    out = Seeded()
    rng = np.random.default_rng(start)
    study_no = 0
    for p in range(patients):
        pid = f"P{p + 1:04d}"
        name = f"Fakename^Patient{p + 1:03d}x{rng.integers(10**6):06d}"
        birth = f"19{40 + p % 50:02d}0{1 + p % 9}1{p % 10}"
        institution = f"Saint Nowhere Hospital {p + 1:03d}"
        base = pool[by_class[wanted[p % len(wanted)]].pop()] if acquisitions else None
        for v in range(visits):
            study_no += 1
            cls = wanted[p % len(wanted)] if acquisitions else wanted[(p + v) % len(wanted)]
            modality = "MR" if other_modality_every and study_no % other_modality_every == 0 else "OT"
            study_uid, series_uid = generate_uid(), generate_uid()
            accession = f"ACC{rng.integers(10**8):08d}"
            phi = {"PatientName": name, "PatientBirthDate": birth, "InstitutionName": institution,
                   "ReferringPhysicianName": f"Doctor^Fictional{p:03d}", "AccessionNumber": accession,
                   "StudyDate": f"2023{1 + v % 12:02d}1{v % 10}"}
            out.phi_strings += [name, birth, institution, f"Fictional{p:03d}", accession, study_uid, series_uid]
            for _ in range(images_per_visit):
                img = _acquisition(base, rng) if base is not None else pool[by_class[cls].pop()]
                blob = dicom_bytes(img, patient_id=pid, study_uid=study_uid, series_uid=series_uid,
                                   label=CLASS_NAMES[cls], modality=modality, phi=phi)
                out.orthanc_ids.append(orthanc.upload(blob))
                out.images.append(img)
                out.labels.append(cls)
                out.patient_ids.append(pid)
                out.modalities.append(modality)
    return out
