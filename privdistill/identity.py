"""Site identity: Ed25519 keys, manifest signatures and signed HTTP requests (shared wire format)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privdistill.errors import ConfigError, ShardVerificationError

SCHEME = "privdistill-v2"
H_SITE = "X-Privdistill-Site"
H_TIME = "X-Privdistill-Timestamp"
H_BODY = "X-Privdistill-Content-SHA256"
H_SIG = "X-Privdistill-Signature"
H_NONCE = "X-Privdistill-Nonce"

# The upload protocol (v1): privdistill's own resumable upload. It borrows tus's header names for the offset and
# length, but it is NOT tus 1.0 and standard tus clients do not speak it: an upload is created by a signed JSON POST
# carrying the manifest and its signature, every request is signed (the headers above), there is no Tus-Resumable
# or Location negotiation, and the coordinator verifies the shard as its chunks arrive.
UPLOAD_PROTOCOL = "privdistill-upload/1"
H_UPLOAD_OFFSET = "Upload-Offset"  # byte offset of a PATCH chunk; the current offset in answers
H_UPLOAD_LENGTH = "Upload-Length"  # the shard's size (answers to HEAD)
H_UPLOAD_STATE = "Upload-State"  # receiving | accepted | rejected | expired
H_UPLOAD_REASON = "Upload-Reason"  # why an upload was rejected (a machine-readable reason)
CHUNK_CONTENT_TYPE = "application/offset+octet-stream"
MAX_CLOCK_SKEW_S = 300  # how far a request's time may lie in the past
MAX_FUTURE_SKEW_S = 30  # ... and in the future (tighter: a future time would stretch its replay window)


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """PEM (PKCS8, unencrypted: the file mode is the protection) written atomically with mode 0600."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private_file(Path(path), data)


def write_private_file(path: Path, data: bytes) -> None:
    """Atomic write of a file only its owner can read (mode 0600 from creation on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def loose_mode(path: Path) -> int | None:
    """The file's permission bits when group or others have any access to it (a secret must be 0600), else None.
    The one check behind every secret file: site and node keys, access tokens, the PACS password."""
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    return mode if mode & 0o077 else None


def load_private_key(path: Path, *, require_private: bool = True) -> Ed25519PrivateKey:
    """Load a site key; refuses a key file that group or others can read (fix: chmod 600 FILE)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"site key {path} does not exist (provision the site first)"])
    if require_private and (mode := loose_mode(path)) is not None:
        raise ConfigError([f"site key {path} has mode {mode:o}: others can read it; run `chmod 600 {path}`"])
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as err:
        raise ConfigError([f"site key {path} is not a PEM private key ({err})"]) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError([f"site key {path} is not an Ed25519 key"])
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64: what `sites add NAME PUBKEY` takes."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def parse_public_key(b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(b64.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as err:
        raise ConfigError([f"not a base64 Ed25519 public key (32 raw bytes): {err}"]) from None


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data)).decode()


def verify(public_b64: str, data: bytes, signature_b64: str) -> bool:
    try:
        sig = base64.b64decode(signature_b64.strip(), validate=True)
        parse_public_key(public_b64).verify(sig, data)
        return True
    except (InvalidSignature, ValueError, TypeError, ConfigError):
        return False


# ----------------------------------------------------------------------------- signed requests
def canonical_request(method: str, host: str, path: str, site: str, timestamp: str, nonce: str, content_type: str,
                      upload_offset: str, body_sha256: str) -> bytes:
    """What a request signature covers: scheme, method, Host, path (with query), site, time, nonce, Content-Type,
    Upload-Offset and the body hash (an absent header signs as the empty string)."""
    return "\n".join((SCHEME, method.upper(), host.lower(), path, site, timestamp, nonce,
                      content_type.strip().lower(), upload_offset.strip(), body_sha256)).encode()


def sign_request(key: Ed25519PrivateKey, site: str, method: str, path: str, body: bytes = b"", *, host: str,
                 content_type: str | None = None, upload_offset: int | str | None = None,
                 now: float | None = None, nonce: str | None = None) -> dict[str, str]:
    """Every header of one signed request as ``site``: the authentication headers, plus Content-Type and
    Upload-Offset when given (send exactly these). ``host`` is the Host header the client sends (host[:port])."""
    ts = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_hex(16)
    digest = hashlib.sha256(body).hexdigest()
    ctype = content_type or ""
    offset = "" if upload_offset is None else str(upload_offset)
    headers = {H_SITE: site, H_TIME: ts, H_NONCE: nonce, H_BODY: digest,
               H_SIG: sign(key, canonical_request(method, host, path, site, ts, nonce, ctype, offset, digest))}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if upload_offset is not None:
        headers[H_UPLOAD_OFFSET] = offset
    return headers


@dataclass(frozen=True)
class SignedHeaders:
    """The authentication headers of a request, read (not yet verified)."""

    site: str
    timestamp: int
    nonce: str
    body_sha256: str


def read_signed_headers(headers: Mapping[str, str], *, now: float | None = None,
                        max_skew_s: int = MAX_CLOCK_SKEW_S,
                        max_future_skew_s: int = MAX_FUTURE_SKEW_S) -> SignedHeaders:
    """The authentication headers, well-formed and inside the time window (``max_skew_s`` into the past,
    ``max_future_skew_s`` into the future); raises ShardVerificationError. Checks no signature yet."""
    lower = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in (H_SITE, H_TIME, H_NONCE, H_BODY, H_SIG) if not lower.get(h.lower())]
    if missing:
        raise _auth_error("missing_auth_headers", f"missing header(s): {', '.join(missing)}: sign every request "
                          "with privdistill.identity.sign_request")
    try:
        t = int(lower[H_TIME.lower()])
    except ValueError:
        raise _auth_error("bad_timestamp", f"{H_TIME} must be integer unix seconds") from None
    now = time.time() if now is None else now
    if not -max_future_skew_s <= now - t <= max_skew_s:
        raise _auth_error("expired_timestamp", f"request time is {int(now - t)} s off the server's clock (allowed: "
                          f"{max_skew_s} s behind, {max_future_skew_s} s ahead); check the site's clock (NTP)")
    nonce, digest = lower[H_NONCE.lower()], lower[H_BODY.lower()]
    if not re.fullmatch(r"[0-9a-f]{32,64}", nonce) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise _auth_error("missing_auth_headers", f"{H_NONCE} must be 32-64 hex digits and {H_BODY} a sha256 in hex")
    return SignedHeaders(site=lower[H_SITE.lower()], timestamp=t, nonce=nonce, body_sha256=digest)


def verify_signed_headers(headers: Mapping[str, str], method: str, path: str, public_b64: str | None,
                          signed: SignedHeaders) -> None:
    """Raise ShardVerificationError("bad_signature") unless the headers (with the *claimed* body hash) are signed by
    ``public_b64``. ``None`` (no such site) verifies against a throw-away key: the same work and the same answer."""
    lower = {k.lower(): v for k, v in headers.items()}
    canonical = canonical_request(method, lower.get("host", ""), path, signed.site, str(signed.timestamp),
                                  signed.nonce, lower.get("content-type", ""), lower.get("upload-offset", ""),
                                  signed.body_sha256)
    key = public_b64 if public_b64 is not None else _UNKNOWN_SITE_KEY
    if not verify(key, canonical, lower[H_SIG.lower()]) or public_b64 is None:
        raise _auth_error("bad_signature", "the request signature does not verify with a registered site key (is the "
                          "site registered, and is this its current key?)")


def check_body(signed: SignedHeaders, body_sha256: str) -> None:
    if not hmac.compare_digest(signed.body_sha256, body_sha256):
        raise _auth_error("body_hash_mismatch", "the body does not match its signed sha256")


def verify_request(headers: Mapping[str, str], method: str, path: str, body: bytes, public_b64: str,
                   *, now: float | None = None, max_skew_s: int = MAX_CLOCK_SKEW_S,
                   max_future_skew_s: int = MAX_FUTURE_SKEW_S) -> SignedHeaders:
    """Raise ShardVerificationError (reason in ``.reason``) unless the request is signed by ``public_b64``:
    the headers first, then the body against the signed hash (a server streams the body between the two)."""
    signed = read_signed_headers(headers, now=now, max_skew_s=max_skew_s, max_future_skew_s=max_future_skew_s)
    verify_signed_headers(headers, method, path, public_b64, signed)
    check_body(signed, hashlib.sha256(body).hexdigest())
    return signed


def _auth_error(reason: str, detail: str) -> ShardVerificationError:
    return ShardVerificationError(detail, reason=reason)


_UNKNOWN_SITE_KEY = public_key_b64(Ed25519PrivateKey.generate())
