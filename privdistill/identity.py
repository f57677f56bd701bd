"""Site identity: Ed25519 keys, manifest signatures and signed HTTP requests (shared wire format)."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privdistill.errors import ConfigError, ShardVerificationError

SCHEME = "privdistill-v1"
H_SITE = "X-Privdistill-Site"
H_TIME = "X-Privdistill-Timestamp"
H_BODY = "X-Privdistill-Content-SHA256"
H_SIG = "X-Privdistill-Signature"
MAX_CLOCK_SKEW_S = 300


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
def canonical_request(method: str, path: str, site: str, timestamp: str, body_sha256: str) -> bytes:
    """What a request signature covers: scheme, method, path (with query), site, time, body hash."""
    return "\n".join((SCHEME, method.upper(), path, site, timestamp, body_sha256)).encode()


def sign_request(key: Ed25519PrivateKey, site: str, method: str, path: str, body: bytes = b"",
                 *, now: float | None = None) -> dict[str, str]:
    """Headers that authenticate one request as ``site``."""
    ts = str(int(time.time() if now is None else now))
    digest = hashlib.sha256(body).hexdigest()
    return {
        H_SITE: site,
        H_TIME: ts,
        H_BODY: digest,
        H_SIG: sign(key, canonical_request(method, path, site, ts, digest)),
    }


def verify_request(headers: Mapping[str, str], method: str, path: str, body: bytes, public_b64: str,
                   *, now: float | None = None, max_skew_s: int = MAX_CLOCK_SKEW_S) -> None:
    """Raise ShardVerificationError (reason in ``.reason``) unless the request is signed by ``public_b64``."""
    lower = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in (H_SITE, H_TIME, H_BODY, H_SIG) if h.lower() not in lower]
    if missing:
        raise _auth_error("missing_auth_headers", f"missing header(s): {', '.join(missing)}")
    ts = lower[H_TIME.lower()]
    try:
        t = int(ts)
    except ValueError:
        raise _auth_error("bad_timestamp", f"{H_TIME} must be integer unix seconds") from None
    now = time.time() if now is None else now
    if abs(now - t) > max_skew_s:
        raise _auth_error("expired_timestamp", f"request time is {int(now - t)} s off the server's clock "
                          f"(limit {max_skew_s} s); check the site's clock (NTP)")
    digest = hashlib.sha256(body).hexdigest()
    if lower[H_BODY.lower()] != digest:
        raise _auth_error("body_hash_mismatch", "the body does not match its signed sha256")
    site = lower[H_SITE.lower()]
    if not verify(public_b64, canonical_request(method, path, site, ts, digest), lower[H_SIG.lower()]):
        raise _auth_error("bad_signature", "request signature does not verify with the site's registered key")


def _auth_error(reason: str, detail: str) -> ShardVerificationError:
    return ShardVerificationError(detail, reason=reason)
