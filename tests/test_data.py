"""Data sources, preprocessing, visits, splitting and the load report."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from structlog.testing import capture_logs

from privdistill.config import DataConfig, DicomSource, VisitsConfig
from privdistill.data.load import load_dataset
from privdistill.data.preprocess import preprocess_image, preprocess_images
from privdistill.data.sources import parse_idx, read_dicom
from privdistill.data.types import ImageSet
from privdistill.data.visits import apply_visits
from privdistill.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")
FAKE_NAME = "Zzyzx^Quillonfakename"


# --------------------------------------------------------------------------- fixtures
def write_idx(path: Path, arr: np.ndarray, *, gz: bool = True, cut: int | None = None) -> Path:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + arr.tobytes()
    blob = blob[:cut] if cut is not None else blob
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def blobs(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """n smooth uint8 images: one Gaussian blob each at a random position."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.uniform(size * 0.3, size * 0.7, size=(n, 2))
    out = [np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2)) for cy, cx in centres]
    return (np.stack(out) * 255).astype(np.uint8)


def idx_source(tmp_path: Path, n_per_class: int = 10, n_classes: int = 5) -> dict:
    images = blobs(n_per_class * n_classes, size=12)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    return {
        "type": "idx",
        "images": str(write_idx(tmp_path / "img.gz", images)),
        "labels": str(write_idx(tmp_path / "lab.gz", labels)),
    }


def folder_source(tmp_path: Path, patients: int = 6, per_patient: int = 2, extra_rows: str = "") -> dict:
    root = tmp_path / "folder"
    (root / "img").mkdir(parents=True)
    rows = ["file,label,prompt,patient_id"]
    for i, img in enumerate(blobs(patients * per_patient, size=20, seed=1)):
        p, label = i // per_patient, ("cat" if i % 2 else "0")
        Image.fromarray(img).save(root / "img" / f"{i:03d}.png")
        rows.append(f"img/{i:03d}.png,{label},a scan {i},P{p:02d}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n" + extra_rows)
    return {"type": "folder", "root": str(root), "class_names": ["dog", "cat"]}


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    patient_id: str | None,
    body_part: str | None,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    compressed: bool = False,
) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG2000Lossless if compressed else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName = FAKE_NAME
    ds.InstitutionName = f"Hospital of {FAKE_NAME}"
    ds.StudyDescription = f"CT for {FAKE_NAME}"
    ds.ReferringPhysicianName = FAKE_NAME
    if patient_id is not None:
        ds.PatientID = patient_id
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
    raw = pixels.astype(np.uint16).tobytes()
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + raw[:32]]) if compressed else raw
    ds.save_as(path, enforce_file_format=True)
    return path


def cfg(**kw) -> DataConfig:
    return DataConfig.model_validate(kw)


# --------------------------------------------------------------------------- readers
def test_idx_gzip_and_raw_parse_and_load(tmp_path: Path) -> None:
    images = blobs(30, size=12)
    assert np.array_equal(parse_idx(write_idx(tmp_path / "a.gz", images)), images)
    assert np.array_equal(parse_idx(write_idx(tmp_path / "a.raw", images, gz=False)), images)

    src = idx_source(tmp_path, n_per_class=10, n_classes=3)
    data = load_dataset(cfg(source=src, resolution=8, test_fraction=0.2), seed=0)

    assert (len(data.train), len(data.test)) == (24, 6)
    assert data.train.images.shape == (24, 1, 8, 8) and data.train.images.dtype == np.float32
    assert data.train.class_names == ["0", "1", "2"]
    assert data.train.patient_ids[0].startswith("img-") and len(set(data.train.patient_ids)) == 24
    assert data.report["source"] | {"errors": []} == {
        "type": "idx",
        "seen": 30,
        "loaded": 30,
        "skipped": 0,
        "skipped_by_reason": {},
        "excluded_by_class": 0,
        "errors": [],
    }


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_raises_naming_file(tmp_path: Path, gz: bool) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((10, 28, 28)), gz=gz, cut=16 + 1200)

    with pytest.raises(DataError) as err:
        load_dataset(cfg(source={"type": "idx", "images": str(path)}), seed=0)

    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert "expected 7840 bytes of image data" in msg and "found 1200" in msg


def test_truncated_gzip_stream_raises_naming_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "imgs.gz", np.zeros((10, 28, 28)))
    path.write_bytes(path.read_bytes()[:30])

    with pytest.raises(DataError, match=r"imgs\.gz.*gzip stream is truncated"):
        parse_idx(path)


def test_npz_medmnist_layout_and_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "derma.npz"
    rgb = np.stack([blobs(12, size=14)] * 3, axis=-1)
    np.savez(path, train_images=rgb, train_labels=(np.arange(12) % 2)[:, None], val_images=rgb[:2])

    data = load_dataset(cfg(source={"type": "npz", "path": str(path)}, resolution=8, channels=3), seed=0)
    assert data.train.images.shape[1:] == (3, 8, 8)
    assert data.report["n_train"] + data.report["n_test"] == 12

    with pytest.raises(
        DataError,
        match=r"missing key\(s\) \['val_labels'\]; keys present: "
        r"\['train_images', 'train_labels', 'val_images'\]",
    ):
        load_dataset(cfg(source={"type": "npz", "path": str(path), "split": "val"}), seed=0)


def test_folder_skips_corrupt_missing_and_escaping_files(tmp_path: Path) -> None:
    extra = (
        "img/corrupt.png,0,x,P90\nimg/missing.png,0,x,P91\n../outside.png,0,x,P92\n/etc/passwd,0,x,P93\n"
        "img/000.png,fish,x,P94\nimg/000.png,7,x,P95\n"
    )
    src = folder_source(tmp_path, patients=6, per_patient=2, extra_rows=extra)
    (Path(src["root"]) / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "outside.png").write_bytes((Path(src["root"]) / "img" / "000.png").read_bytes())

    data = load_dataset(cfg(source=src, resolution=16, test_fraction=0.34), seed=0)

    rep = data.report["source"]
    assert (rep["seen"], rep["loaded"], rep["skipped"]) == (18, 12, 6)
    assert rep["skipped_by_reason"] == {
        "bad_label": 2,
        "missing_file": 1,
        "path_outside_root": 2,
        "unreadable_image": 1,
    }
    assert "img/000.png: label 'fish' is not an integer nor one of class_names" in rep["errors"]
    assert "img/corrupt.png: not a readable image (UnidentifiedImageError)" in rep["errors"]
    assert any(e.startswith("img/missing.png:") for e in rep["errors"])
    assert not any(str(tmp_path) in e for e in rep["errors"])  # names stay relative to the root
    assert len(data.train) + len(data.test) == 12
    assert data.train.class_names == ["dog", "cat"]
    assert set(data.train.patient_ids) | set(data.test.patient_ids) == {f"P{i:02d}" for i in range(6)}
    assert data.train.prompts is not None and data.train.prompts[0].startswith("a scan ")
    json.dumps(data.report)


def test_no_usable_image_says_what_was_tried(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    (root / "manifest.csv").write_text("file\na.png\nb.png\n")

    with pytest.raises(
        DataError, match=r"no usable image in the data.source \(folder\): 2 file.*'missing_file': 2"
    ):
        load_dataset(cfg(source={"type": "folder", "root": str(root)}), seed=0)


# --------------------------------------------------------------------------- dicom
def dicom_tree(tmp_path: Path) -> Path:
    root = tmp_path / "dicom"
    (root / "a" / "b").mkdir(parents=True)
    for i, img in enumerate(blobs(8, size=16, seed=2).astype(np.uint16) * 16):
        write_dicom(
            root / "a" / f"{i}.dcm", img, patient_id=f"PAT-{i // 2}", body_part=["CHEST", "HEAD"][i % 2]
        )
    write_dicom(
        root / "a" / "b" / "jpeg2000.dcm",
        np.ones((16, 16)),
        patient_id="PAT-9",
        body_part="HEAD",
        compressed=True,
    )
    write_dicom(root / "a" / "b" / "noid.dcm", np.ones((16, 16)), patient_id=None, body_part="HEAD")
    (root / "notes.txt").write_text(f"patient {FAKE_NAME}")
    return root


def test_dicom_keeps_only_pixels_label_and_patient_id(tmp_path: Path) -> None:
    root = dicom_tree(tmp_path)
    src = {
        "type": "dicom",
        "root": str(root),
        "label_tag": "BodyPartExamined",
        "class_names": ["CHEST", "HEAD"],
    }

    with capture_logs() as logs:
        data = load_dataset(cfg(source=src, resolution=8, test_fraction=0.25), seed=0)

    rep = data.report["source"]
    assert (rep["seen"], rep["loaded"]) == (11, 8)
    assert rep["skipped_by_reason"] == {"missing_patient_id": 1, "not_dicom": 1, "undecodable_compressed": 1}
    assert (data.report["n_train"], data.report["n_test"]) == (6, 2)
    assert set(data.test.patient_ids).isdisjoint(data.train.patient_ids)
    assert data.train.class_names == ["CHEST", "HEAD"]
    everything = json.dumps(
        [
            data.report,
            data.train.class_names,
            data.train.prompts,
            data.train.patient_ids.tolist(),
            data.test.patient_ids.tolist(),
            [str(e) for e in logs],
        ]
    )
    assert FAKE_NAME not in everything and "Zzyzx" not in everything
    info = json.dumps([e for e in logs if e["log_level"] != "debug"], default=str)
    assert "PAT-" not in info and ".dcm" not in info and str(tmp_path) not in info


def test_dicom_rescale_and_monochrome1(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(16, dtype=np.uint16) * 100, (16, 1))
    write_dicom(tmp_path / "m2.dcm", ramp, patient_id="P1", body_part=None, slope=2.0)
    write_dicom(tmp_path / "m1.dcm", ramp, patient_id="P2", body_part=None, photometric="MONOCHROME1")

    recs = {r.ref: r for r in read_dicom(DicomSource(type="dicom", root=tmp_path)).records}

    assert recs["m2.dcm"].image[0, :3].tolist() == [-1024.0, -824.0, -624.0]
    m2 = preprocess_image(recs["m2.dcm"].image, resolution=16, channels=1)
    m1 = preprocess_image(recs["m1.dcm"].image, resolution=16, channels=1)
    assert (m2[0, 0, 0], m2[0, 0, -1]) == (-1.0, 1.0)
    np.testing.assert_allclose(m1, -m2, atol=1e-6)  # MONOCHROME1: bright means low values


# --------------------------------------------------------------------------- preprocessing
def test_preprocess_shapes_channels_and_ranges() -> None:
    gray = np.full((20, 30), 255, np.uint8)
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 0] = 255
    u16 = np.array([[0, 65535], [65535, 0]], np.uint16)
    flt = np.array([[-5.0, 5.0], [0.0, 5.0]], np.float32)

    out = preprocess_images([gray, rgb], resolution=8, channels=3)
    assert out.shape == (2, 3, 8, 8) and out.dtype == np.float32
    assert np.all(out[0] == 1.0)  # white stays exactly white through resize and gray->RGB
    np.testing.assert_allclose(out[1, :, 0, 0], [1.0, -1.0, -1.0], atol=1e-6)
    red_as_gray = preprocess_image(rgb, resolution=8, channels=1)
    np.testing.assert_allclose(red_as_gray, 0.299 * 2 - 1, atol=1e-5)
    assert preprocess_image(u16, resolution=2, channels=1)[0].tolist() == [[-1.0, 1.0], [1.0, -1.0]]
    assert preprocess_image(flt, resolution=2, channels=1)[0].tolist() == [[-1.0, 1.0], [0.0, 1.0]]
    big = preprocess_image(
        np.random.default_rng(0).integers(0, 256, (64, 48)).astype(np.uint8), resolution=16, channels=1
    )
    assert big.shape == (1, 16, 16) and big.min() >= -1.0 and big.max() <= 1.0


# --------------------------------------------------------------------------- labels, classes, caps
def test_classes_and_max_per_class_are_respected_and_deterministic(tmp_path: Path) -> None:
    src = idx_source(tmp_path, n_per_class=10, n_classes=5) | {"class_names": list("abcde")}
    c = cfg(source=src, classes=[3, 1], max_per_class=3, max_test_per_class=1, resolution=8)

    a, b, other = load_dataset(c, seed=7), load_dataset(c, seed=7), load_dataset(c, seed=8)

    assert a.train.class_names == ["b", "d"]
    assert a.report["train_per_class"] == {"b": 3, "d": 3}
    assert a.report["test_per_class"] == {"b": 1, "d": 1}
    assert a.report["source"]["excluded_by_class"] == 30
    assert a.train.patient_ids.tolist() == b.train.patient_ids.tolist()
    assert a.train.patient_ids.tolist() != other.train.patient_ids.tolist()
    np.testing.assert_array_equal(a.train.images, b.train.images)


def test_max_per_class_counts_patients_not_images(tmp_path: Path) -> None:
    src = folder_source(tmp_path, patients=12, per_patient=2)  # each patient: one "dog", one "cat"
    data = load_dataset(cfg(source=src, max_per_class=3, test_fraction=0.25), seed=0)

    assert data.report["n_patients_train"] <= 6
    assert data.report["train_per_class"] == {"dog": 3, "cat": 3}
    for label in (0, 1):
        assert len(set(data.train.patient_ids[data.train.labels == label])) == 3


def test_prompt_template(tmp_path: Path) -> None:
    src = idx_source(tmp_path, n_per_class=4, n_classes=2) | {"class_names": ["shirt", "trouser"]}
    data = load_dataset(cfg(source=src, prompt_template="an image of a {label}", resolution=8), seed=0)

    expected = [f"an image of a {['shirt', 'trouser'][i]}" for i in data.train.labels]
    assert data.train.prompts == expected and data.report["has_prompts"] is True


# --------------------------------------------------------------------------- split
def test_split_is_patient_disjoint_and_seeded(tmp_path: Path) -> None:
    src = folder_source(tmp_path, patients=10, per_patient=3)
    c = cfg(source=src, test_fraction=0.3, resolution=8)

    a, b = load_dataset(c, seed=0), load_dataset(c, seed=1)

    for d in (a, b):
        assert set(d.train.patient_ids).isdisjoint(d.test.patient_ids)
        assert (d.report["n_patients_train"], d.report["n_patients_test"]) == (7, 3)
        assert (len(d.train), len(d.test)) == (21, 9)  # every image of a patient on one side
    assert set(a.test.patient_ids) != set(b.test.patient_ids)


def test_partitions_are_patient_disjoint_and_cover_the_source(tmp_path: Path) -> None:
    src = folder_source(tmp_path, patients=30, per_patient=2)
    parts = [
        load_dataset(cfg(source=src, test_fraction=0.2, resolution=8, partition={"index": i, "count": 3}), seed=0)
        for i in range(3)
    ]
    whole = load_dataset(cfg(source=src, resolution=8), seed=0)

    patients = [set(p.train.patient_ids) | set(p.test.patient_ids) for p in parts]
    assert all(patients) and sum(len(p) for p in patients) == 30
    assert patients[0].isdisjoint(patients[1]) and patients[1].isdisjoint(patients[2])
    assert set().union(*patients) == set(whole.train.patient_ids) | set(whole.test.patient_ids)
    assert parts[1].report["partition"] == {"index": 1, "count": 3}
    with pytest.raises(Exception, match="must be below count"):
        cfg(source=src, partition={"index": 3, "count": 3})


def test_test_source_sharing_patients_is_refused(tmp_path: Path) -> None:
    src = folder_source(tmp_path, patients=4, per_patient=1)
    with pytest.raises(DataError, match="4 patient\\(s\\) appear in both"):
        load_dataset(cfg(source=src, test_source=src), seed=0)


# --------------------------------------------------------------------------- visits
def test_visits_repeat_each_patient_with_small_changes() -> None:
    base = ImageSet(
        images=preprocess_images(list(blobs(4, size=16)), resolution=16, channels=1),
        labels=np.arange(4),
        patient_ids=np.array([f"img-{i:06d}" for i in range(4)]),
        class_names=list("abcd"),
    )
    v = VisitsConfig(count=3, max_shift=1, max_rotation_deg=5.0, intensity_jitter=0.05)

    out = apply_visits(base, v, seed=0)

    assert len(out) == 12
    assert out.patient_ids.tolist() == [f"img-{i:06d}" for i in range(4) for _ in range(3)]
    assert out.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    x = out.images.reshape(4, 3, -1)
    within = [np.abs(x[p, i] - x[p, j]).mean() for p in range(4) for i, j in ((0, 1), (0, 2), (1, 2))]
    between = [np.abs(x[p, 0] - x[q, 0]).mean() for p in range(4) for q in range(p + 1, 4)]
    assert min(within) > 1e-3  # visits differ from each other ...
    assert max(within) < 0.5 * np.mean(between)  # ... but much less than different patients do
    np.testing.assert_array_equal(out.images, apply_visits(base, v, seed=0).images)


def test_visits_apply_to_train_only_and_not_with_real_patient_ids(tmp_path: Path) -> None:
    src = idx_source(tmp_path, n_per_class=10, n_classes=2)
    data = load_dataset(cfg(source=src, resolution=12, visits={"count": 3}), seed=0)
    assert data.report["n_train"] == 3 * data.report["n_patients_train"] == 48
    assert data.report["n_test"] == data.report["n_patients_test"] == 4
    raw = preprocess_images(list(blobs(20, size=12)), resolution=12, channels=1)
    test_rows = [int(p.split("-")[1]) for p in data.test.patient_ids]
    np.testing.assert_array_equal(data.test.images, raw[test_rows])  # test images untouched

    folder = folder_source(tmp_path, patients=5, per_patient=2)
    with capture_logs() as logs:
        data = load_dataset(cfg(source=folder, visits={"count": 3}), seed=0)
    assert len(data.train) + len(data.test) == 10 and data.report["visits_per_patient"] is None
    assert any(e["event"] == "data.visits_ignored" and e["log_level"] == "warning" for e in logs)


# --------------------------------------------------------------------------- real data
@pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST IDX files not installed in {FASHION}",
)
def test_fashion_mnist_two_classes() -> None:
    src = {
        "type": "idx",
        "images": str(FASHION / "train-images-idx3-ubyte.gz"),
        "labels": str(FASHION / "train-labels-idx1-ubyte.gz"),
        "class_names": ["T-shirt/top", "Trouser"],
    }
    data = load_dataset(
        cfg(source=src, classes=[0, 1], max_per_class=20, max_test_per_class=5, resolution=16), seed=0
    )

    assert data.train.images.shape == (40, 1, 16, 16)
    assert data.train.images.min() >= -1.0 and data.train.images.max() <= 1.0
    assert data.train.images.min() == -1.0 and data.train.images.max() > 0.9
    assert data.train.class_names == ["T-shirt/top", "Trouser"]
    assert data.report["train_per_class"] == {"T-shirt/top": 20, "Trouser": 20}
    assert data.report["source"]["seen"] == 60000 and data.report["source"]["excluded_by_class"] == 48000
    assert set(data.train.patient_ids).isdisjoint(data.test.patient_ids)
