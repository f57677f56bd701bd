"""Shard verification as the bytes arrive: the coordinator feeds each uploaded chunk once (hash, tar headers and
member checks streamed), so a finished upload is never read again to be verified.

The stream takes only the canonical layout that ``write_canonical_tar`` writes (ustar headers byte-equal to
``canonical_info``, zero padding, two zero blocks, zero padding to the record size, nothing after it), and every
member check of ``privdistill.shard.verify_tar`` (name, order, duplicates, size cap, manifest hash, PNG structure
and pixel data length, sample JSON, prompts against the verifier's vocabulary). Whatever it does not take, it
refuses; for the refusal's *reason* the caller asks ``verify_tar`` (the reference check) on the finished file, so a
refused shard gets the same reason either way (``finish_or_explain``)."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterable
from pathlib import Path

from privdistill.errors import ShardVerificationError
from privdistill.prompts import check_prompts
from privdistill.shard import MAX_MEMBER_BYTES, Manifest, _check_member_name, sample_key, verify_tar
from privdistill.shard_content import canonical_info, check_png, check_sample_json

BLOCK = tarfile.BLOCKSIZE
READ_BLOCK = 1 << 20


def _header_bytes(name: str, size: int) -> bytes:
    return canonical_info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


class TarStreamVerifier:
    """``feed`` the shard's bytes in order (any chunking); ``finish`` raises ShardVerificationError unless the whole
    stream is a canonical shard tar matching ``manifest``. ``offset`` is how many bytes were fed."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.offset = 0
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self._pos = 0  # stream offset of self._buf[0]
        self._index = 0  # members parsed
        self._seen: set[str] = set()
        self._member: tuple[str, int] | None = None  # (name, size) whose data is awaited
        self._trailer_end: int | None = None  # where the archive must end, once its first zero block is seen
        self._prompts: list[tuple[str, str]] = []
        self.error: ShardVerificationError | None = None  # the first problem seen; parsing stops there

    def feed(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.offset += len(data)
        if self.error is not None:
            return
        if self.offset > self.manifest.tar_size:
            self.error = ShardVerificationError("shard size differs from the manifest", "size_mismatch")
            return
        self._buf += data
        try:
            self._parse()
        except ShardVerificationError as err:
            self.error = err
            self._buf = bytearray()

    def _parse(self) -> None:
        buf, at = self._buf, 0
        while True:
            if self._trailer_end is not None:  # zeros only, up to the record boundary
                if buf[at:].count(0) != len(buf) - at:
                    raise ShardVerificationError("bytes after the end of the archive", "non_canonical_tar")
                at = len(buf)
                break
            if self._member is None:
                if len(buf) - at < BLOCK:
                    break
                block = bytes(buf[at:at + BLOCK])
                if block.count(0) == BLOCK:  # first end-of-archive block
                    start = self._pos + at
                    end = start + 2 * BLOCK
                    self._trailer_end = end + (-end % tarfile.RECORDSIZE)
                    continue
                self._member = self._header(block)
                at += BLOCK
            name, size = self._member
            padded = size + (-size % BLOCK)
            if len(buf) - at < padded:
                break
            data = bytes(buf[at:at + size])
            if buf[at + size:at + padded].count(0) != padded - size:
                raise ShardVerificationError(f"tar member {name!r}: non-zero padding", "non_canonical_tar")
            self._check_member(name, data)
            self._member = None
            at += padded
        del buf[:at]
        self._pos += at

    def _header(self, block: bytes) -> tuple[str, int]:
        """The member this header announces, if the header is byte for byte the canonical one for the next member
        in shard order (its name is known; only the size is read from the block)."""
        key = sample_key(self.manifest.shard_id, self._index // 2)
        name = f"{key}.{'png' if self._index % 2 == 0 else 'json'}"
        try:
            size = int(block[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)  # canonical: octal digits
            canonical = _header_bytes(name, size)
        except (ValueError, OverflowError) as err:
            raise ShardVerificationError(f"tar header not readable ({err})", "malformed_tar") from None
        if block != canonical:  # another name, type, mode, owner, time, format or extension: refused
            raise ShardVerificationError(f"tar member {self._index + 1} is not {name!r} with a canonical header",
                                         "non_canonical_tar")
        _check_member_name(name)
        if size > MAX_MEMBER_BYTES:
            raise ShardVerificationError(f"tar member {name!r} is {size} bytes", "oversized_member")
        if name not in self.manifest.members or name in self._seen:
            raise ShardVerificationError(f"tar member {name!r} is not in the manifest", "member_set_mismatch")
        self._seen.add(name)
        return name, size

    def _check_member(self, name: str, data: bytes) -> None:
        m = self.manifest
        if hashlib.sha256(data).hexdigest() != m.members[name]:
            raise ShardVerificationError(f"tar member {name!r} hash differs from the manifest", "hash_mismatch")
        key = sample_key(m.shard_id, self._index // 2)
        if self._index % 2 == 0:
            check_png(name, data, resolution=m.resolution, channels=m.channels)
        else:
            cond = m.conditioning
            prompt = check_sample_json(name, data, key=key, conditioning=cond.type, class_names=list(cond.class_names))
            if prompt is not None:
                self._prompts.append((name, prompt))
        self._index += 1

    def finish(self, *, vocabulary: Iterable[str] | None = None) -> None:
        """All bytes fed: raise unless they are exactly the manifest's shard (size, sha256, members, canonical)."""
        m = self.manifest
        if self.offset != m.tar_size:
            raise ShardVerificationError("shard size differs from the manifest", "size_mismatch")
        if self._hash.hexdigest() != m.tar_sha256:
            raise ShardVerificationError("shard sha256 differs from the manifest", "hash_mismatch")
        if self.error is not None:
            raise self.error
        if self._trailer_end != self.offset or self._member is not None:
            raise ShardVerificationError("the tar is not in canonical form (truncated, or not ended by two zero "
                                         "blocks and zero padding to the record size)", "non_canonical_tar")
        if len(self._seen) != len(m.members):
            raise ShardVerificationError(f"{len(m.members) - len(self._seen)} manifest member(s) missing from the tar",
                                         "member_set_mismatch")
        vocab = frozenset(m.conditioning.vocabulary if vocabulary is None else vocabulary)
        for name, prompt in self._prompts:
            check_prompts([prompt], vocab, where=f"tar member {name!r}")

    def finish_or_explain(self, tar_path: Path, *, vocabulary: Iterable[str] | None = None) -> None:
        """``finish``; on a refusal, the reason is ``verify_tar``'s on the finished file (the reference check reads
        it once more: only refused shards pay for that). The stream's own refusal stands if the reference passes."""
        try:
            self.finish(vocabulary=vocabulary)
        except ShardVerificationError as streamed:
            verify_tar(tar_path, self.manifest, vocabulary=vocabulary)
            raise streamed from None

    def feed_file(self, path: Path, upto: int) -> None:
        """Catch up from a staging file: feed its first ``upto`` bytes (after a restart, or when another worker
        process took the earlier chunks)."""
        with open(path, "rb") as fh:
            left = upto - self.offset
            fh.seek(self.offset)
            while left > 0:
                block = fh.read(min(READ_BLOCK, left))
                if not block:
                    raise ShardVerificationError("staging file shorter than its ledger offset", "size_mismatch")
                self.feed(block)
                left -= len(block)
