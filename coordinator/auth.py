"""Request authentication: a FastAPI dependency that reads the raw body under a size limit and verifies the
site's Ed25519 request signature (privdistill.identity) against the ledger's registered key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Header, Request
from starlette.concurrency import run_in_threadpool

from privdistill.errors import ShardVerificationError
from privdistill.identity import H_BODY, H_SIG, H_SITE, H_TIME, verify_request

from coordinator.ledger import Ledger
from coordinator.schemas import ApiError


@dataclass(frozen=True)
class Authed:
    """An authenticated request: the site's name and the exact body bytes it signed."""

    site: str
    body: bytes


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not an integer") from None
        if n > limit:
            raise ApiError(413, "request_too_large", f"request body is {n} bytes; the limit is {limit} "
                           "(send smaller chunks)")
    buf = bytearray()
    async for part in request.stream():
        buf += part
        if len(buf) > limit:
            raise ApiError(413, "request_too_large", f"request body exceeds the limit of {limit} bytes "
                           "(send smaller chunks)")
    return bytes(buf)


def signed_path(request: Request) -> str:
    """The path as the client sent it (raw, percent-encoding kept) plus the query string: what was signed."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def site_auth(ledger: Ledger, body_limit: int, max_skew_s: int) -> Callable[..., Awaitable[Authed]]:
    """Dependency factory: verifies the signed request; ``body_limit`` bounds what is read."""

    async def authenticate(
        request: Request,
        site: str | None = Header(None, alias=H_SITE, description="registered site name"),
        timestamp: str | None = Header(None, alias=H_TIME, description="unix seconds when signed"),
        body_sha256: str | None = Header(None, alias=H_BODY, description="sha256 hex of the body"),
        signature: str | None = Header(None, alias=H_SIG, description="base64 Ed25519 over the canonical request"),
    ) -> Authed:
        if not (site and timestamp and body_sha256 and signature):
            missing = [h for h, v in ((H_SITE, site), (H_TIME, timestamp), (H_BODY, body_sha256), (H_SIG, signature))
                       if not v]
            raise ApiError(401, "missing_auth_headers", f"missing header(s) {', '.join(missing)}: sign every /v1 "
                           "request with privdistill.identity.sign_request")
        row = await run_in_threadpool(ledger.site, site)
        if row is None:
            raise ApiError(401, "unknown_site", f"site {site[:64]!r} is not registered with this coordinator "
                           "(ask the operator to run `privdistill-coordinator sites add`)")
        if row.revoked:
            raise ApiError(403, "revoked_site", f"site {site!r} was revoked at {row.revoked_at}; contact the "
                           "coordinator operator")
        body = await read_body(request, body_limit)
        try:
            verify_request(request.headers, request.method, signed_path(request), body, row.public_key,
                           max_skew_s=max_skew_s)
        except ShardVerificationError as err:
            raise ApiError(401, err.reason, str(err)) from None
        await run_in_threadpool(ledger.touch_site, site)
        return Authed(site=site, body=body)

    return authenticate
