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
from typing import TYPE_CHECKING

from privdistill.errors import ShardVerificationError
from privdistill.prompts import check_prompts
from privdistill.shard import MAX_MEMBER_BYTES, Manifest, _check_member_name, sample_key, verify_tar
from privdistill.shard_content import canonical_info, check_png, check_sample_json

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

BLOCK = tarfile.BLOCKSIZE
ZERO_BLOCK = bytes(BLOCK)
READ_BLOCK = 1 << 20


def _header_bytes(name: str, size: int) -> bytes:
    return canonical_info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


class CanonicalHeaders:
    """``canonical_info(name, size)``'s ustar header bytes, as tarfile writes them, for one shard's members.

    tarfile builds the first header of each name length (~30 us of Python per member otherwise). A later member whose
    name has that length (a shard's names differ only in their 6-digit index) gets that header with its name, size
    and checksum fields rewritten in tarfile's own formats (name NUL-padded to 100 bytes, size as 11 octal digits and
    NUL, checksum = 256 + the sum of every other byte, as 6 octal digits, NUL, space). Any other name or size goes
    through tarfile again; ``tests/test_shard_stream.py`` compares both ways on many names and sizes."""

    def __init__(self) -> None:
        self._templates: dict[int, bytes] = {}  # name length in bytes -> a header tarfile made (.png, .json)

    def __call__(self, name: str, size: int) -> bytes:
        encoded = name.encode("utf-8", "surrogateescape")
        plain = len(encoded) <= 100 and name.isascii() and 0 <= size < 8 ** 11  # no prefix split, no base-256 size
        template = self._templates.get(len(encoded)) if plain else None
        if template is None:
            header = _header_bytes(name, size)
            if plain and len(self._templates) < 4:
                self._templates[len(encoded)] = header
            return header
        buf = bytearray(template)
        buf[0:len(encoded)] = encoded
        buf[124:136] = b"%011o\0" % size
        buf[148:156] = b" " * 8
        buf[148:155] = b"%06o\0" % sum(buf)
        return bytes(buf)


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
        self._headers = CanonicalHeaders()
        self.error: ShardVerificationError | None = None  # the first problem seen; parsing stops there

    def feed(self, data: bytes | memoryview, *, sha256: Hash | None = None) -> None:
        """Take the next bytes. ``sha256``: a hash object that has hashed exactly ``data`` and nothing else (the
        request body's digest): when ``data`` starts the stream its state becomes the tar's hash, so the first
        chunk's bytes are hashed once for both (a copy is taken; the caller's object is not changed)."""
        if sha256 is not None and self.offset == 0 and sha256.name == "sha256":
            self._hash = sha256.copy()
        else:
            self._hash.update(data)
        self.offset += len(data)
        if self.error is not None:
            return
        if self.offset > self.manifest.tar_size:
            self.error = ShardVerificationError("shard size differs from the manifest", "size_mismatch")
            return
        try:
            self._take(memoryview(data))
        except ShardVerificationError as err:
            self.error = err
            self._buf = bytearray()

    def _unit(self) -> int:
        """Bytes of the next unit to parse: a header block, or the awaited member's data with its padding."""
        if self._member is None:
            return BLOCK
        size = self._member[1]
        return size + (-size % BLOCK)

    def _take(self, data: memoryview) -> None:
        """Parse ``data`` in place (no copy of whole chunks): a unit split across feeds is first completed in
        ``_buf`` from the head of ``data``; what is left of an incomplete unit at the end is kept there."""
        if self._buf and self._trailer_end is None:
            need = self._unit() - len(self._buf)
            self._buf += data[:need]
            data = data[need:]
            if len(self._buf) < self._unit():
                return
            used = self._parse(memoryview(self._buf))  # exactly that unit
            self._buf = bytearray()  # a new buffer: views into the old one may live on (never resized)
            self._pos += used
        used = self._parse(data)
        self._pos += used
        self._buf = bytearray(data[used:])

    def _parse(self, buf: memoryview) -> int:
        """Parse every complete unit at the start of ``buf``; returns how many bytes they took."""
        at = 0
        while True:
            if self._trailer_end is not None:  # zeros only, up to the record boundary
                if bytes(buf[at:]).count(0) != len(buf) - at:
                    raise ShardVerificationError("bytes after the end of the archive", "non_canonical_tar")
                return len(buf)
            if self._member is None:
                if len(buf) - at < BLOCK:
                    return at
                block = bytes(buf[at:at + BLOCK])
                if block == ZERO_BLOCK:  # first end-of-archive block
                    end = self._pos + at + 2 * BLOCK
                    self._trailer_end = end + (-end % tarfile.RECORDSIZE)
                    continue
                self._member = self._header(block)
                at += BLOCK
            name, size = self._member
            padded = size + (-size % BLOCK)
            if len(buf) - at < padded:
                return at
            if bytes(buf[at + size:at + padded]).count(0) != padded - size:
                raise ShardVerificationError(f"tar member {name!r}: non-zero padding", "non_canonical_tar")
            self._check_member(name, buf[at:at + size])
            self._member = None
            at += padded

    def _header(self, block: bytes) -> tuple[str, int]:
        """The member this header announces, if the header is byte for byte the canonical one for the next member
        in shard order (its name is known; only the size is read from the block)."""
        key = sample_key(self.manifest.shard_id, self._index // 2)
        name = f"{key}.{'png' if self._index % 2 == 0 else 'json'}"
        try:
            size = int(block[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)  # canonical: octal digits
            canonical = self._headers(name, size)
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

    def _check_member(self, name: str, data: memoryview) -> None:
        m = self.manifest
        if hashlib.sha256(data).hexdigest() != m.members[name]:
            raise ShardVerificationError(f"tar member {name!r} hash differs from the manifest", "hash_mismatch")
        key = sample_key(m.shard_id, self._index // 2)
        if self._index % 2 == 0:
            check_png(name, data, resolution=m.resolution, channels=m.channels)
        else:
            cond = m.conditioning
            prompt = check_sample_json(name, bytes(data), key=key, conditioning=cond.type, class_names=list(cond.class_names))
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
