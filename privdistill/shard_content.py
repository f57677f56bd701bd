"""Canonical shard content: the one tar layout, PNG and sample-JSON form a shard may have, and the
bounds on a manifest's privacy section. A shard is accepted only if it is byte for byte what the
packager would write for its samples, so nothing else (metadata, trailing bytes, free text) can ride
along. Every check raises ShardVerificationError with a reason code; no PNG is decoded before its
header has shown the expected, capped size."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tarfile
import zlib
from typing import Any, BinaryIO

from privdistill.errors import ShardVerificationError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 1024 * 1024  # the largest image a shard may hold (resolution <= 1024)
PNG_CHUNKS = (b"IHDR", b"IDAT", b"IEND")
COLOUR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (8-bit grayscale, 8-bit RGB)
SAMPLE_KEYS = ("class_name", "label", "prompt", "sample_id")

MAX_PRIVACY_BYTES = 32 * 1024
MAX_PRIVACY_DEPTH = 8  # privacy.mia.teacher.tpr_at_fpr.<fpr>.ci95[0] is 7 deep
MAX_PRIVACY_ITEMS = 64  # keys of one mapping, items of one list
MAX_PRIVACY_STRINGS = 128  # names of kinds, detectors and non-DP keys; each short
MAX_PRIVACY_STRING = 400
_PRIVACY_KEY = re.compile(r"^[a-z0-9_.-]{1,64}$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")


def _bad(message: str, reason: str) -> ShardVerificationError:
    return ShardVerificationError(message, reason)


# ----------------------------------------------------------------------------- tar
def canonical_info(name: str, size: int) -> tarfile.TarInfo:
    """The only tar header a member may have: regular file, mode 0644, uid/gid 0, no user/group names, mtime 0."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    info.type = tarfile.REGTYPE
    return info


def write_canonical_tar(members: list[tuple[str, bytes]], fileobj: BinaryIO) -> None:
    """Write ``members`` in order as a ustar archive with canonical headers (what the packager ships)."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tar:
        for name, data in members:
            tar.addfile(canonical_info(name, len(data)), io.BytesIO(data))


class CanonicalTar:
    """Hashes the canonical serialisation of the members as they are read (ustar headers from ``canonical_info``,
    data padded to 512 bytes, two zero blocks, zero padding to tarfile's record size: byte for byte what
    ``write_canonical_tar`` writes); ``finish`` compares it with the shard's hash and size."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._size = 0

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self._size += len(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(canonical_info(name, len(data)).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        self._write(data)
        self._write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))

    def finish(self, tar_sha256: str, tar_size: int) -> None:
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._write(b"\0" * (-self._size % tarfile.RECORDSIZE))
        if (self._hash.hexdigest(), self._size) != (tar_sha256, tar_size):
            raise _bad(f"the tar is not in canonical form ({tar_size} bytes; its members re-serialised "
                       f"canonically are {self._size}): headers with user/group names, modes, times or "
                       "extensions, or bytes after the end of the archive, are refused", "non_canonical_tar")


# ----------------------------------------------------------------------------- PNG
def png_size(name: str, data: bytes) -> tuple[int, int, int]:
    """(width, height, colour type) read from the IHDR chunk alone, before any decoding."""
    if not data.startswith(PNG_MAGIC) or len(data) < 33 or data[12:16] != b"IHDR":
        raise _bad(f"tar member {name!r} is not a PNG image", "non_png_member")
    width, height, depth, colour, compression, flt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if (depth, compression, flt, interlace) != (8, 0, 0, 0):
        raise _bad(f"tar member {name!r}: only 8-bit, non-interlaced PNGs are allowed", "invalid_png")
    return width, height, colour


def check_png(name: str, data: bytes | memoryview, *, resolution: int, channels: int) -> None:
    """IHDR first (size = the manifest's resolution, capped), then IDAT chunks only, IEND last and nothing after
    it, every CRC right, and the pixel data exactly as long as the header says. ``data`` may be a memoryview into
    a larger buffer (the streamed check): chunks are read in place, not copied."""
    width, height, colour = png_size(name, bytes(data[:33]))
    if width * height > MAX_PIXELS or (width, height) != (resolution, resolution):
        raise _bad(f"tar member {name!r} is {width}x{height}; the manifest declares {resolution}x{resolution} "
                   f"images (at most {MAX_PIXELS} pixels); refused before decoding", "png_size_mismatch")
    if colour != COLOUR_TYPE[channels]:
        raise _bad(f"tar member {name!r} has PNG colour type {colour}; {channels}-channel shards hold colour type "
                   f"{COLOUR_TYPE[channels]}", "invalid_png")
    view = memoryview(data)
    pos, types, idat = len(PNG_MAGIC), [], []
    while pos < len(view):
        if pos + 12 > len(view):
            raise _bad(f"tar member {name!r}: truncated PNG chunk", "invalid_png")
        length, kind = struct.unpack_from(">I4s", view, pos)
        body = view[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(view):
            raise _bad(f"tar member {name!r}: truncated PNG chunk", "invalid_png")
        (crc,) = struct.unpack_from(">I", view, pos + 8 + length)
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise _bad(f"tar member {name!r}: PNG chunk CRC mismatch", "invalid_png")
        if kind not in PNG_CHUNKS:
            raise _bad(f"tar member {name!r} holds a PNG {kind.decode('latin-1')!r} chunk; only IHDR, IDAT and IEND "
                       "are allowed (no text or other metadata)", "png_extra_chunk")
        types.append(kind)
        if kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
        if kind == b"IEND":
            break
    if pos != len(view):
        raise _bad(f"tar member {name!r} has {len(view) - pos} byte(s) after the PNG's IEND chunk", "png_extra_chunk")
    if types[:1] != [b"IHDR"] or types[-1:] != [b"IEND"] or types.count(b"IHDR") != 1 or \
            types[1:-1] != [b"IDAT"] * (len(types) - 2) or len(types) < 3:
        raise _bad(f"tar member {name!r}: PNG chunks must be IHDR, IDAT..., IEND", "invalid_png")
    row = 1 + width * channels
    expected = height * row
    inflater = zlib.decompressobj()
    try:
        stream = idat[0] if len(idat) == 1 else b"".join(idat)
        raw = inflater.decompress(stream, expected + 1)  # bounded: a bomb stops at expected + 1 bytes
    except zlib.error as err:
        raise _bad(f"tar member {name!r}: corrupt PNG pixel data ({err})", "invalid_png") from None
    if len(raw) != expected or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise _bad(f"tar member {name!r}: PNG pixel data is not exactly {width}x{height}", "invalid_png")
    if max(raw[0:expected:row], default=0) > 4:  # every row's filter byte (a C-level slice, not a Python loop)
        raise _bad(f"tar member {name!r}: PNG row filter out of range", "invalid_png")


# ----------------------------------------------------------------------------- sample JSON
def sample_json(key: str, label: int | None, class_name: str | None, prompt: str | None) -> bytes:
    """The canonical bytes of one sample's JSON member."""
    return json.dumps({"sample_id": key, "label": label, "class_name": class_name, "prompt": prompt},
                      sort_keys=True).encode()


def check_sample_json(name: str, data: bytes, *, key: str, conditioning: str, class_names: list[str]) -> str | None:
    """The known keys only, ``sample_id`` = the member key, the label and class name from the manifest's
    classes, the fields the conditioning type needs; canonical bytes. Returns the prompt (checked by the caller)."""
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad(f"tar member {name!r} is not JSON", "malformed_sample") from None
    if not isinstance(meta, dict) or sorted(meta) != list(SAMPLE_KEYS):
        raise _bad(f"tar member {name!r}: a sample holds exactly the keys {list(SAMPLE_KEYS)}", "malformed_sample")
    if meta["sample_id"] != key:
        raise _bad(f"tar member {name!r}: sample_id differs from the member key", "malformed_sample")
    label, cname, prompt = meta["label"], meta["class_name"], meta["prompt"]
    if label is not None:
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(class_names):
            raise _bad(f"tar member {name!r}: label is not an index into the manifest's class names", "malformed_sample")
        if cname != class_names[label]:
            raise _bad(f"tar member {name!r}: class_name is not the manifest's class name for its label",
                       "malformed_sample")
    elif cname is not None:
        raise _bad(f"tar member {name!r}: class_name without a label", "malformed_sample")
    need_label, need_prompt = conditioning == "class", conditioning == "text"
    if (need_label and label is None) or (need_prompt != (prompt is not None)) or \
            (conditioning == "none" and label is not None):
        raise _bad(f"tar member {name!r}: its label/prompt do not fit {conditioning!r} conditioning",
                   "malformed_sample")
    if prompt is not None and not isinstance(prompt, str):
        raise _bad(f"tar member {name!r}: prompt is not text", "malformed_sample")
    if data != sample_json(key, label, cname, prompt):
        raise _bad(f"tar member {name!r} is not in canonical JSON form", "malformed_sample")
    return prompt


# ----------------------------------------------------------------------------- privacy section
def validate_privacy_section(section: Any) -> dict[str, Any]:
    """Structural bounds on a manifest's aggregate privacy report: a mapping of at most 32 KiB and depth 4,
    snake_case keys, numbers, booleans, null and short printable-ASCII strings only; then every field the
    typed privacy report (privdistill.privacy_report.PrivacyReport) knows must have its type."""
    if not isinstance(section, dict):
        raise ValueError("must be a mapping of aggregate numbers")
    size = len(json.dumps(section, allow_nan=True, default=str))
    if size > MAX_PRIVACY_BYTES:
        raise ValueError(f"is {size} bytes; an aggregate report needs at most {MAX_PRIVACY_BYTES}")
    strings = 0

    def walk(node: Any, path: str, depth: int) -> None:
        nonlocal strings
        if depth > MAX_PRIVACY_DEPTH:
            raise ValueError(f"{path}: nested deeper than {MAX_PRIVACY_DEPTH} levels")
        if isinstance(node, dict):
            if len(node) > MAX_PRIVACY_ITEMS:
                raise ValueError(f"{path}: more than {MAX_PRIVACY_ITEMS} keys")
            for k, v in node.items():
                if not isinstance(k, str) or not _PRIVACY_KEY.fullmatch(k):
                    raise ValueError(f"{path}: keys are snake_case names (a-z, 0-9, _, - and .), at most 64 characters")
                walk(v, f"{path}.{k}", depth + 1)
        elif isinstance(node, list):
            if len(node) > MAX_PRIVACY_ITEMS:
                raise ValueError(f"{path}: more than {MAX_PRIVACY_ITEMS} items")
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]", depth + 1)
        elif isinstance(node, str):
            strings += 1
            if strings > MAX_PRIVACY_STRINGS or len(node) > MAX_PRIVACY_STRING or not _PRINTABLE.fullmatch(node):
                raise ValueError(f"{path}: text values are short printable ASCII (at most {MAX_PRIVACY_STRINGS} "
                                 f"of at most {MAX_PRIVACY_STRING} characters)")
        elif node is not None and not isinstance(node, (bool, int, float)):
            raise ValueError(f"{path}: only numbers, booleans, null, short text, lists and mappings")

    walk(section, "privacy", 1)
    from pydantic import ValidationError

    from privdistill.privacy_report import PrivacyReport

    try:
        PrivacyReport.model_validate(section)
    except ValidationError as e:
        where = "; ".join(".".join(str(x) for x in err["loc"]) + ": " + err["msg"] for err in e.errors()[:5])
        raise ValueError(f"does not match the privacy-report schema ({where})") from None
    return section
