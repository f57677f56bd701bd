"""The streamed shard check takes exactly what verify_tar takes: the same decision on a good shard, on every chunking,
and on hundreds of damaged copies (byte flips, truncations, appended bytes, swapped members), with verify_tar's
reason for every refusal."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from privdistill.data.types import ImageSet
from privdistill.errors import ShardVerificationError
from privdistill.identity import generate_key
from privdistill.shard import parse_manifest, verify_tar, write_shard
from privdistill.shard_stream import CanonicalHeaders, TarStreamVerifier, _header_bytes


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    rng = np.random.default_rng(0)
    kept = ImageSet(rng.uniform(-1, 1, (5, 1, 16, 16)).astype(np.float32), labels=np.array([0, 1, 0, 1, 1]),
                    class_names=["cat", "dog"])
    out = tmp_path_factory.mktemp("stream") / "s"
    write_shard(kept, out, site_id="a", shard_id="s1", config_hash="0" * 64, privacy={"kept": 5}, key=generate_key())
    return out, (out / "shard.tar").read_bytes()


def _streamed(manifest, data: bytes, path: Path, chunk: int) -> str | None:
    v = TarStreamVerifier(manifest)
    for i in range(0, len(data), chunk):
        v.feed(data[i:i + chunk])
    try:
        v.finish_or_explain(path)
    except ShardVerificationError as err:
        return err.reason
    return None


def _reference(manifest, path: Path) -> str | None:
    try:
        verify_tar(path, manifest)
    except ShardVerificationError as err:
        return err.reason
    return None


@pytest.mark.parametrize("chunk", [1, 511, 512, 4096, 1 << 20])
def test_a_good_shard_passes_in_any_chunking(shard, chunk: int) -> None:
    out, data = shard
    manifest = parse_manifest((out / "manifest.json").read_bytes())
    assert _streamed(manifest, data, out / "shard.tar", chunk) is None


def test_damaged_copies_get_the_reference_decision_and_reason(shard, tmp_path: Path) -> None:
    out, data = shard
    manifest = parse_manifest((out / "manifest.json").read_bytes())
    rng = np.random.default_rng(1)
    variants: list[bytes] = []
    for pos in rng.choice(len(data), 150, replace=False):  # one flipped bit anywhere (headers, data, padding)
        variants.append(data[:pos] + bytes([data[pos] ^ (1 << int(rng.integers(8)))]) + data[pos + 1:])
    variants += [data[:n] for n in (0, 100, 512, len(data) // 2, len(data) - 1)]
    variants += [data + b"\0" * 512, data + b"x"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the same members re-packed in another order or format
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    members[0][0].mtime = 1  # a header field the canonical form fixes
    for fmt, order in ((tarfile.PAX_FORMAT, members), (tarfile.USTAR_FORMAT, members[2:] + members[:2])):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for info, body in order:
                tar.addfile(info, io.BytesIO(body))
        variants.append(buf.getvalue())
    variants = [v for v in variants if v != data]  # (the PAX writer emits plain ustar headers for these members)
    refused = 0
    for i, bad in enumerate(variants):
        path = tmp_path / f"v{i}.tar"
        path.write_bytes(bad)
        expected = _reference(manifest, path)
        refused += expected is not None
        for chunk in (700, 1 << 20):
            assert _streamed(manifest, bad, path, chunk) == expected, (i, chunk)
    assert refused == len(variants)  # every variant is damaged: none may pass either check


def test_canonical_headers_are_tarfiles_bytes() -> None:
    rng = np.random.default_rng(2)
    headers = CanonicalHeaders()
    names = [f"shard-{k}_{i:06d}.{ext}" for k in ("a", "bb") for i in (0, 1, 9, 123456, 999999) for ext in ("png", "json")]
    names += ["x" * 100, "y" * 100, "d/" + "z" * 98, "d/" + "z" * 120, "é.png", "f.png"]  # ustar prefix, non-ASCII
    sizes = [0, 1, 511, 512, 8 ** 7, 8 ** 11 - 1, 8 ** 11, *rng.integers(0, 1 << 30, 20).tolist()]

    def made(make, name: str, size: int) -> bytes | str:
        try:
            return make(name, size)
        except ValueError:  # tarfile's refusal (a name or size ustar cannot hold): the same either way
            return "ValueError"

    for name in names:
        for size in sizes:
            assert made(headers, name, int(size)) == made(_header_bytes, name, int(size)), (name, size)


def test_the_first_chunks_body_digest_becomes_the_shard_hash(shard) -> None:
    """Uploads pass the request body's sha256 object with each chunk; only the stream's first chunk adopts it (the
    bytes are not hashed again), later ones are hashed as before, and a digest of other bytes makes the shard's
    hash differ (so the reuse is real and a wrong digest can never pass)."""
    import hashlib

    out, data = shard
    manifest = parse_manifest((out / "manifest.json").read_bytes())
    chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    v = TarStreamVerifier(manifest)
    for c in chunks:
        v.feed(c, sha256=hashlib.sha256(c))
    v.finish()
    v = TarStreamVerifier(manifest)
    v.feed(chunks[0], sha256=hashlib.sha256(chunks[0] + b"x"))
    for c in chunks[1:]:
        v.feed(c)
    with pytest.raises(ShardVerificationError) as err:
        v.finish()
    assert err.value.reason == "hash_mismatch"
