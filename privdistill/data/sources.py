"""Source readers (IDX, MedMNIST .npz, folder + CSV, DICOM tree; PACS in pacs.py): raw records plus per-file errors."""

from __future__ import annotations

import csv
import gzip
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import structlog
from PIL import Image, UnidentifiedImageError
from pydicom import Dataset, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError

from privdistill.config import DicomSource, FolderSource, IdxSource, NpzSource, PacsSource
from privdistill.errors import DataError

log = structlog.get_logger(__name__)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(slots=True)
class RawRecord:
    """One image as a source stores it; ``ref`` names it for error messages (relative to the source)."""

    image: np.ndarray  # HW or HWC; uint8, uint16 or float
    label: int | str | None
    prompt: str | None
    patient_id: str | None
    ref: str


@dataclass(slots=True)
class Skipped:
    """A file or record that could not be used; ``reason`` is a short category for counting."""

    ref: str
    reason: str
    detail: str

    def message(self) -> str:
        return f"{self.ref}: {self.detail}"


@dataclass
class RawSource:
    """Everything a reader found: usable records, skipped files, and which fields the source provides."""

    kind: str
    records: list[RawRecord]
    skipped: list[Skipped] = field(default_factory=list)
    seen: int = 0
    has_labels: bool = False
    has_prompts: bool = False
    has_patient_ids: bool = False
    class_names: list[str] | None = None


# --------------------------------------------------------------------------- idx
def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}; check data.source paths in the config")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        raise DataError(
            f"IDX file {path}: the gzip stream is truncated or corrupt ({err}); "
            "copy or download the file again"
        ) from None


def parse_idx(path: Path, what: str = "image") -> np.ndarray:
    """Parse a (gzip or raw) IDX file: magic 0x0000, dtype code, ndims, big-endian u32 dims, data."""
    buf = _read_bytes(path)
    hint = "the file is truncated or not an IDX file; copy or download it again"
    if len(buf) < 4 or buf[0:2] != b"\x00\x00" or buf[2] not in _IDX_DTYPES:
        raise DataError(f"IDX file {path}: bad magic number {buf[:4].hex() or '<empty>'}; {hint}")
    dtype, ndim = np.dtype(_IDX_DTYPES[buf[2]]), buf[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(buf) < header:
        raise DataError(f"IDX file {path}: header declares {ndim} dimensions but is cut short; {hint}")
    dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    found = len(buf) - header
    if found != expected:
        raise DataError(
            f"IDX file {path}: expected {expected} bytes of {what} data for shape {dims}, "
            f"found {found}; {hint}"
        )
    return np.frombuffer(buf, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(src: IdxSource) -> RawSource:
    images = parse_idx(src.images, "image")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(
            f"IDX file {src.images}: expected images [N, H, W] or [N, H, W, C], got {images.shape}"
        )
    labels = None
    if src.labels is not None:
        labels = parse_idx(src.labels, "label").reshape(-1)
        if len(labels) != len(images):
            raise DataError(
                f"IDX files {src.images} and {src.labels}: {len(images)} images but {len(labels)} labels; "
                "check that both files come from the same split"
            )
    records = [
        RawRecord(img, None if labels is None else int(labels[i]), None, None, f"{src.images.name}[{i}]")
        for i, img in enumerate(images)
    ]
    return RawSource(
        "idx", records, seen=len(images), has_labels=labels is not None, class_names=src.class_names
    )


# --------------------------------------------------------------------------- npz
def read_npz(src: NpzSource) -> RawSource:
    if not src.path.is_file():
        raise DataError(f"npz file not found: {src.path}; check data.source.path in the config")
    try:
        with np.load(src.path, allow_pickle=False) as z:
            keys = sorted(z.files)
            ik, lk = f"{src.split}_images", f"{src.split}_labels"
            missing = [k for k in (ik, lk) if k not in keys]
            if missing:
                raise DataError(
                    f"npz file {src.path}: missing key(s) {missing}; keys present: {keys}. "
                    "Set data.source.split to one of the splits present (MedMNIST layout)"
                )
            images, labels = z[ik], z[lk]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"npz file {src.path} cannot be read ({err}); copy or download it again") from None
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"npz file {src.path}: {ik} must be [N, H, W] or [N, H, W, 3], got {images.shape}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"npz file {src.path}: {lk} must be [N] or [N, 1] with N={len(images)}, got {labels.shape} "
            "(multi-label datasets are not supported)"
        )
    records = [RawRecord(img, int(labels[i]), None, None, f"{ik}[{i}]") for i, img in enumerate(images)]
    return RawSource("npz", records, seen=len(images), has_labels=True, class_names=src.class_names)


# --------------------------------------------------------------------------- folder
def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16L", "I;16B", "F", "L", "RGB"):
        return np.asarray(img)
    if img.mode == "I":
        return np.asarray(img).astype(np.float32)
    if img.mode in ("1", "LA") or (img.mode == "P" and "transparency" not in img.info and _palette_gray(img)):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))


def _palette_gray(img: Image.Image) -> bool:
    pal = np.asarray(img.getpalette() or [], np.uint8).reshape(-1, 3)
    return bool(len(pal)) and bool((pal == pal[:, :1]).all())


def _safe_join(root: Path, name: str) -> Path | None:
    """root/name, or None when ``name`` is absolute or escapes root (``..``, drive, symlink)."""
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        return None
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return None
    full = root / name
    try:
        full.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return full


def read_folder(src: FolderSource) -> RawSource:
    root = src.root
    manifest = src.manifest if src.manifest is not None else root / "manifest.csv"
    if not root.is_dir():
        raise DataError(f"folder source root is not a directory: {root}; check data.source.root")
    if not manifest.is_file():
        raise DataError(
            f"manifest not found: {manifest}; write a CSV with a 'file' column "
            "(and optionally label, prompt, patient_id)"
        )
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [(c or "").strip() for c in reader.fieldnames or []]
        rows = list(reader)
    if "file" not in columns:
        raise DataError(f"manifest {manifest.name}: no 'file' column; columns present: {columns}")
    out = RawSource(
        "folder",
        [],
        seen=len(rows),
        class_names=src.class_names,
        has_labels="label" in columns,
        has_prompts="prompt" in columns,
        has_patient_ids="patient_id" in columns,
    )
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        name = row.get("file", "")
        ref = name or f"{manifest.name} line {n}"
        path = _safe_join(root, name) if name else None
        if not name:
            out.skipped.append(Skipped(ref, "bad_manifest_row", "empty 'file' entry"))
            continue
        if path is None:
            out.skipped.append(
                Skipped(ref, "path_outside_root", "path is absolute or escapes the source root; refused")
            )
            continue
        if not path.is_file():
            out.skipped.append(Skipped(ref, "missing_file", "file listed in the manifest does not exist"))
            continue
        try:
            with Image.open(path) as img:
                img.load()
                arr = _pil_to_array(img)
        except (
            UnidentifiedImageError,
            Image.DecompressionBombError,
            OSError,
            ValueError,
            SyntaxError,
        ) as err:
            log.debug("data.folder.unreadable", file=str(path), error=str(err))
            out.skipped.append(
                Skipped(ref, "unreadable_image", f"not a readable image ({type(err).__name__})")
            )
            continue
        out.records.append(
            RawRecord(
                arr,
                row.get("label") if out.has_labels else None,
                row.get("prompt") if out.has_prompts else None,
                row.get("patient_id") if out.has_patient_ids else None,
                ref,
            )
        )
    return out


# --------------------------------------------------------------------------- dicom
def _dicom_value(ds: Dataset, keyword: str) -> str | None:
    """The value of one named tag as text, or None when absent or empty."""
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _dicom_pixels(ds: Dataset) -> np.ndarray:
    """Pixel data after the modality rescale; MONOCHROME1 negated so that bright means dense (float32)."""
    arr = np.asarray(ds.pixel_array)
    spp = int(ds.get("SamplesPerPixel", 1))
    if not (arr.ndim == 2 or (arr.ndim == 3 and spp == 3 and arr.shape[-1] == 3)):
        raise ValueError(f"unsupported pixel array shape {arr.shape} (multi-frame images are not supported)")
    arr = arr.astype(np.float32)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        arr = arr * float(slope if slope is not None else 1.0) + float(intercept or 0.0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = -arr  # preprocessing rescales floats by their min/max, so negation is a full inversion
    return arr


def read_dicom(src: DicomSource) -> RawSource:
    """Read every file under ``root``; only pixel data, ``label_tag`` and ``patient_id_tag`` are kept."""
    for option, kw in (("label_tag", src.label_tag), ("patient_id_tag", src.patient_id_tag)):
        if kw is not None and tag_for_keyword(kw) is None:
            raise DataError(
                f"data.source.{option}: {kw!r} is not a DICOM keyword (e.g. 'PatientID', 'BodyPartExamined')"
            )
    if not src.root.is_dir():
        raise DataError(f"DICOM source root is not a directory: {src.root}; check data.source.root")
    files = sorted(p for p in src.root.rglob("*") if p.is_file())
    out = RawSource(
        "dicom",
        [],
        seen=len(files),
        has_labels=src.label_tag is not None,
        has_patient_ids=True,
        class_names=src.class_names,
    )
    for path in files:
        ref = path.relative_to(src.root).as_posix()
        try:
            ds = dcmread(path)
        except InvalidDicomError:
            out.skipped.append(Skipped(ref, "not_dicom", "not a DICOM file"))
            continue
        except Exception as err:  # pydicom raises many types for malformed files
            log.debug("data.dicom.malformed", file=str(path), error=str(err))
            out.skipped.append(Skipped(ref, "malformed_dicom", f"malformed DICOM ({type(err).__name__})"))
            continue
        item = dicom_record(ds, ref, label_tag=src.label_tag, patient_id_tag=src.patient_id_tag)
        if isinstance(item, Skipped):
            out.skipped.append(item)
        else:
            out.records.append(item)
    return out


def dicom_record(ds: Dataset, ref: str, *, label_tag: str | None, patient_id_tag: str) -> RawRecord | Skipped:
    """One parsed DICOM dataset as a record holding only its pixels, ``label_tag`` and ``patient_id_tag``."""
    if "PixelData" not in ds:
        return Skipped(ref, "no_pixel_data", "DICOM file without pixel data")
    try:
        pixels = _dicom_pixels(ds)
    except Exception as err:  # missing decoder plugin, corrupt fragments, odd shapes
        log.debug("data.dicom.pixels", ref=ref, error=str(err))
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and ts.is_compressed:
            return Skipped(
                ref,
                "undecodable_compressed",
                f"compressed pixel data ({ts.name}) could not be decoded; "
                "install a pydicom decoder (pylibjpeg, gdcm) or export uncompressed",
            )
        return Skipped(ref, "bad_pixel_data", f"pixel data cannot be used ({type(err).__name__})")
    label = _dicom_value(ds, label_tag) if label_tag else None
    return RawRecord(pixels, label, None, _dicom_value(ds, patient_id_tag), ref)


def read_source(src: IdxSource | NpzSource | FolderSource | DicomSource | PacsSource) -> RawSource:
    """Dispatch on ``src.type``; log counts (never file names) at info level."""
    if isinstance(src, IdxSource):
        raw = read_idx(src)
    elif isinstance(src, NpzSource):
        raw = read_npz(src)
    elif isinstance(src, FolderSource):
        raw = read_folder(src)
    elif isinstance(src, PacsSource):
        from privdistill.data.pacs import read_pacs

        raw = read_pacs(src)
    else:
        raw = read_dicom(src)
    for s in raw.skipped:
        log.debug("data.skipped", source=raw.kind, file=s.ref, reason=s.reason)
    log.info(
        "data.source_read", source=raw.kind, seen=raw.seen, read=len(raw.records), skipped=len(raw.skipped)
    )
    return raw
