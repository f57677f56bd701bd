"""The shard: the only thing a site exports. A WebDataset tar (one PNG + one JSON per synthetic
sample) plus manifest.json (hashes, conditioning vocabulary, aggregate privacy report) and
manifest.sig (Ed25519 over the manifest bytes). Writing, parsing and verifying live here, shared
by the site agent and the coordinator."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from privdistill import __version__
from privdistill.data.types import ImageSet
from privdistill.errors import ShardVerificationError
from privdistill.identity import sign, verify
from privdistill.prompts import (
    MAX_NAME_CHARS,
    character_problem,
    check_prompts,
    is_vocabulary_word,
    vocabulary_from,
    words,
    words_outside,  # noqa: F401 - the packager and gate import it from here
)
from privdistill.shard_content import (  # noqa: F401 - part of the wire format
    PNG_MAGIC,
    SAMPLE_KEYS,
    CanonicalTar,
    check_png,
    check_sample_json,
    sample_json,
    validate_privacy_section,
    write_canonical_tar,
)

FORMAT: Final = "privdistill-shard/2"
SHARD_TAR, MANIFEST, SIGNATURE = "shard.tar", "manifest.json", "manifest.sig"
MAX_MEMBER_BYTES = 4 << 20
MAX_MEMBERS = 400_000
MAX_MANIFEST_BYTES = 64 << 20
MAX_CLASSES = 1000
MAX_VOCABULARY = 10_000
MAX_RESOLUTION = 1024
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_HEX64 = r"^[0-9a-f]{64}$"

# the manifest's privacy section check; the typed privacy-report model replaces it (one assignment)
PRIVACY_VALIDATOR: Callable[[Any], dict[str, Any]] = validate_privacy_section


class Conditioning(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["class", "text", "none"]
    class_names: list[str] = Field(default_factory=list, max_length=MAX_CLASSES)
    vocabulary: list[str] = Field(default_factory=list, max_length=MAX_VOCABULARY)  # prompt words (text only)

    @field_validator("class_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            problem = character_problem(name, limit=MAX_NAME_CHARS)
            if problem is not None:
                raise ValueError(f"class name {i + 1} {problem}")
        if len(set(v)) != len(v):
            raise ValueError("class names repeat")
        return v

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary(cls, v: list[str]) -> list[str]:
        bad = sum(not is_vocabulary_word(w) for w in v)
        if bad:
            raise ValueError(f"{bad} entr(y/ies) are not one lowercase ASCII word each")
        return v

    @model_validator(mode="after")
    def _fits_type(self) -> Conditioning:
        if self.type != "text" and self.vocabulary:
            raise ValueError(f"a {self.type!r}-conditioned shard carries no prompt vocabulary")
        if self.type == "none" and self.class_names:
            raise ValueError("an unconditioned shard carries no class names")
        return self


class Manifest(BaseModel):
    """Everything the coordinator needs to verify a shard; aggregate numbers only, nothing per image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["privdistill-shard/2"] = FORMAT
    site_id: str = Field(pattern=ID_PATTERN)
    shard_id: str = Field(pattern=ID_PATTERN)
    created: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})$")  # no free text
    software_version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,39}$")
    config_hash: str = Field(pattern=_HEX64)
    sample_count: int = Field(ge=1, le=MAX_MEMBERS // 2)
    tar_sha256: str = Field(pattern=_HEX64)
    tar_size: int = Field(ge=1)
    resolution: int = Field(ge=1, le=MAX_RESOLUTION)  # every image is resolution x resolution
    channels: Literal[1, 3]
    members: dict[str, str]
    conditioning: Conditioning
    privacy: dict[str, Any]

    @field_validator("privacy")
    @classmethod
    def _privacy(cls, v: Any) -> dict[str, Any]:
        return PRIVACY_VALIDATOR(v)

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed and shipped."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


# ----------------------------------------------------------------------------- encoding
def encode_png(image: np.ndarray) -> bytes:
    """One CHW image in [-1, 1] to deterministic PNG bytes (no metadata, no timestamps)."""
    from PIL import Image

    arr = np.clip(np.rint((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    pil = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, channels: int = 1) -> np.ndarray:
    """PNG bytes to a CHW float32 image in [-1, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr / 127.5 - 1.0


def tokens(text: str) -> list[str]:
    """The words of ``text`` as the tokenizer reads them (privdistill.prompts.words)."""
    return words(text)


def prompt_vocabulary(template: str | None, class_names: list[str], extra: Iterable[str] = ()) -> list[str]:
    """The allow-list of prompt words: the template's fixed words, the class names and ``extra``."""
    return vocabulary_from(template, class_names, extra)


def sample_members(kept: ImageSet, shard_id: str) -> list[tuple[str, bytes]]:
    """The tar members for ``kept`` in shard order: ``{key}.png`` then ``{key}.json`` per sample."""
    members = []
    for i in range(len(kept)):
        key = sample_key(shard_id, i)
        label = None if kept.labels is None else int(kept.labels[i])
        class_name = None if label is None or not kept.class_names else kept.class_names[label]
        prompt = None if kept.prompts is None else kept.prompts[i]
        members.append((f"{key}.png", encode_png(kept.images[i])))
        members.append((f"{key}.json", sample_json(key, label, class_name, prompt)))
    return members


def sample_key(shard_id: str, index: int) -> str:
    return f"{shard_id}_{index:06d}"


def _write_tar(members: list[tuple[str, bytes]], path: Path) -> None:
    with open(path, "wb") as fh:
        write_canonical_tar(members, fh)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(
    kept: ImageSet, out_dir: Path, *, site_id: str, shard_id: str, config_hash: str, privacy: dict[str, Any],
    key: Ed25519PrivateKey, vocabulary: list[str] | None = None,
) -> Manifest:
    """Write shard.tar, manifest.json and manifest.sig into ``out_dir`` (created atomically).

    ``kept`` must be synthetic (no patient ids). Prompts outside ``vocabulary`` are refused here
    already; the export gate and the coordinator check again."""
    if kept.patient_ids is not None:
        raise ShardVerificationError("refusing to package images that carry patient ids (real data)", "real_data")
    if len(kept) == 0:
        raise ShardVerificationError("nothing to package: the filter kept no synthetic image", "empty_shard")
    cond_type = "text" if kept.prompts is not None else ("class" if kept.labels is not None else "none")
    vocab = sorted(set(vocabulary or []))
    if kept.prompts is not None:
        check_prompts(kept.prompts, vocab)  # characters first, then words; nothing is written on refusal
    channels, height, width = (int(d) for d in np.shape(kept.images)[1:4])
    if height != width or channels not in (1, 3):
        raise ShardVerificationError(f"images are {channels}x{height}x{width}; a shard holds square 1- or 3-channel "
                                     "images", "resolution_mismatch")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ShardVerificationError(f"{out_dir} already exists; a shard is written once", "shard_exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        members = sample_members(kept, shard_id)
        _write_tar(members, tmp / SHARD_TAR)
        manifest = _manifest(
            site_id=site_id, shard_id=shard_id, created=datetime.now(UTC).isoformat(timespec="seconds"),
            software_version=__version__, config_hash=config_hash, sample_count=len(kept),
            tar_sha256=sha256_path(tmp / SHARD_TAR), tar_size=(tmp / SHARD_TAR).stat().st_size,
            resolution=width, channels=channels, members={name: sha256_bytes(data) for name, data in members},
            conditioning={"type": cond_type, "class_names": list(kept.class_names) if cond_type != "none" else [],
                          "vocabulary": vocab if cond_type == "text" else []},
            privacy=privacy,
        )
        body = manifest.to_bytes()
        (tmp / MANIFEST).write_bytes(body)
        (tmp / SIGNATURE).write_text(sign(key, body) + "\n")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(**fields: Any) -> Manifest:
    try:
        return Manifest(**fields)
    except ValidationError as err:
        raise ShardVerificationError(f"refusing to package: {_problems(err)}", "malformed_manifest") from None


def _problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()[:5])


# ----------------------------------------------------------------------------- verification
def parse_manifest(data: bytes) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ShardVerificationError(f"manifest is {len(data)} bytes (limit {MAX_MANIFEST_BYTES})", "oversized_manifest")
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as err:
        raise ShardVerificationError(f"malformed manifest: {_problems(err)}", "malformed_manifest") from None
    if len(manifest.members) != 2 * manifest.sample_count:
        raise ShardVerificationError(
            f"manifest lists {len(manifest.members)} members for {manifest.sample_count} samples (expected 2 each)",
            "malformed_manifest")
    for name, digest in manifest.members.items():
        _check_member_name(name)
        if not re.fullmatch(_HEX64, digest):
            raise ShardVerificationError(f"manifest member {name!r} has no sha256 hex digest", "malformed_manifest")
    return manifest


def verify_manifest_signature(data: bytes, signature_b64: str, public_b64: str) -> None:
    if not verify(public_b64, data, signature_b64):
        raise ShardVerificationError("manifest signature does not verify with the site's registered key",
                                     "bad_manifest_signature")


def _check_member_name(name: str) -> None:
    if name.startswith("/") or "\\" in name or "/" in name or name in {".", ".."} or ".." in name.split("."):
        raise ShardVerificationError(f"tar member {name!r}: absolute path, directory or '..' is not allowed",
                                     "unsafe_member_name")
    key, dot, ext = name.partition(".")
    if not dot or ext not in ("png", "json") or not re.fullmatch(r"[a-z0-9_-]{1,128}", key):
        raise ShardVerificationError(f"tar member {name!r}: only KEY.png and KEY.json members are allowed",
                                     "non_png_member")


def verify_tar(tar_path: Path, manifest: Manifest, *, vocabulary: Iterable[str] | None = None) -> None:
    """Every byte of ``tar_path`` against ``manifest``: size and sha256, then member by member (name, type,
    order, hash), each PNG's header before any decoding, each sample JSON, each prompt against ``vocabulary``
    (the verifier's own allow-list; the manifest's only when None), and finally that the tar is exactly its
    canonical re-serialisation. Raises ShardVerificationError with a reason."""
    tar_path = Path(tar_path)
    if tar_path.stat().st_size != manifest.tar_size:
        raise ShardVerificationError("shard size differs from the manifest", "size_mismatch")
    if sha256_path(tar_path) != manifest.tar_sha256:
        raise ShardVerificationError("shard sha256 differs from the manifest", "hash_mismatch")
    vocab = frozenset(manifest.conditioning.vocabulary if vocabulary is None else vocabulary)
    cond = manifest.conditioning
    canonical = CanonicalTar()
    seen: set[str] = set()
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for index, info in enumerate(tar):
                _check_member_name(info.name)
                if info.name in seen:
                    raise ShardVerificationError(f"duplicate tar member {info.name!r}", "duplicate_member")
                seen.add(info.name)
                if not info.isreg():
                    raise ShardVerificationError(f"tar member {info.name!r} is not a regular file", "non_regular_member")
                if info.size > MAX_MEMBER_BYTES:
                    raise ShardVerificationError(f"tar member {info.name!r} is {info.size} bytes", "oversized_member")
                expected = manifest.members.get(info.name)
                if expected is None:
                    raise ShardVerificationError(f"tar member {info.name!r} is not in the manifest", "member_set_mismatch")
                key = sample_key(manifest.shard_id, index // 2)
                if info.name != f"{key}.{'png' if index % 2 == 0 else 'json'}":
                    raise ShardVerificationError(
                        f"tar member {info.name!r} is out of order: member {index + 1} must be {key}.png then "
                        f"{key}.json", "non_canonical_tar")
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                if sha256_bytes(data) != expected:
                    raise ShardVerificationError(f"tar member {info.name!r} hash differs from the manifest", "hash_mismatch")
                if index % 2 == 0:
                    check_png(info.name, data, resolution=manifest.resolution, channels=manifest.channels)
                else:
                    prompt = check_sample_json(info.name, data, key=key, conditioning=cond.type,
                                               class_names=list(cond.class_names))
                    if prompt is not None:
                        check_prompts([prompt], vocab, where=f"tar member {info.name!r}")
                canonical.add(info.name, data)
    except tarfile.TarError as err:
        raise ShardVerificationError(f"shard is not a readable tar file ({err})", "malformed_tar") from None
    missing = set(manifest.members) - seen
    if missing:
        raise ShardVerificationError(f"{len(missing)} manifest member(s) missing from the tar", "member_set_mismatch")
    canonical.finish(manifest.tar_sha256, manifest.tar_size)


def verify_shard_dir(shard_dir: Path, public_b64: str) -> Manifest:
    """Signature, manifest and every member of a shard directory; returns the manifest."""
    shard_dir = Path(shard_dir)
    for name in (SHARD_TAR, MANIFEST, SIGNATURE):
        if not (shard_dir / name).is_file():
            raise ShardVerificationError(f"{shard_dir} has no {name}: not a packaged shard", "not_a_shard")
    body = (shard_dir / MANIFEST).read_bytes()
    verify_manifest_signature(body, (shard_dir / SIGNATURE).read_text(), public_b64)
    manifest = parse_manifest(body)
    verify_tar(shard_dir / SHARD_TAR, manifest)
    return manifest


# ----------------------------------------------------------------------------- reading
def iter_samples(tar_paths: Iterable[Path]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, png bytes, sample json) streamed from verified shards with WebDataset."""
    import webdataset as wds

    urls = [str(p) for p in tar_paths]
    if not urls:
        return
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield sample["__key__"], sample["png"], json.loads(sample["json"])


def load_shards(shards: list[tuple[Path, Manifest]], channels: int = 1) -> ImageSet:
    """Stream verified shards into one ImageSet; labels are re-indexed over the union of class names."""
    cond = {m.conditioning.type for _, m in shards}
    if len(cond) > 1:
        raise ShardVerificationError(f"shards mix conditioning types {sorted(cond)}; train them separately",
                                     "mixed_conditioning")
    names: list[str] = []
    for _, m in shards:
        names += [n for n in m.conditioning.class_names if n not in names]
    images: list[np.ndarray] = []
    labels: list[int] = []
    prompts: list[str | None] = []
    for _, png, meta in iter_samples([p for p, _ in shards]):
        images.append(decode_png(png, channels))
        cname = meta.get("class_name")
        labels.append(names.index(cname) if cname in names else -1)
        prompts.append(meta.get("prompt"))
    if not images:
        raise ShardVerificationError("the accepted shards hold no sample", "empty_shard")
    has_labels = all(v >= 0 for v in labels)
    present = [p for p in prompts if p is not None]
    return ImageSet(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, np.int64) if has_labels else None,
        prompts=present if len(present) == len(prompts) else None,
        class_names=names if has_labels else [],
    )
