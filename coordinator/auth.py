"""Request authentication, verified before any body byte is read: the signed headers (which carry the body's hash)
are checked against the site's registered Ed25519 key (privdistill.identity), the nonce against the replay cache,
and only then is the body streamed, hashed as it arrives, under a size limit and a deadline."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Header, Request
from starlette.concurrency import run_in_threadpool

from coordinator.config import LimitsConfig
from coordinator.ledger import Ledger
from coordinator.replay import ReplayCache
from coordinator.schemas import ApiError
from privdistill.errors import ShardVerificationError
from privdistill.identity import (
    H_BODY,
    H_NONCE,
    H_SIG,
    H_SITE,
    H_TIME,
    SignedHeaders,
    check_body,
    read_signed_headers,
    verify_signed_headers,
)

if TYPE_CHECKING:
    from hashlib import _Hash as Hash


@dataclass(frozen=True)
class Authed:
    """An authenticated request: the site's name, the exact body bytes it signed, and the sha256 object that hashed
    exactly those bytes (an upload's first chunk reuses its state as the shard's hash: one pass, not two)."""

    site: str
    body: bytes
    sha256: Hash | None = None


def _too_large(n: int | None, limit: int) -> ApiError:
    said = f"request body is {n} bytes" if n is not None else "request body exceeds the limit"
    return ApiError(413, "request_too_large", f"{said}; the limit is {limit} bytes (send smaller chunks)")


async def read_body(request: Request, limit: int, *, timeout_s: float) -> tuple[bytes, Hash]:
    """The body and the sha256 object that hashed it while streaming; 413 as soon as it is known to exceed
    ``limit`` (never buffered past it), 408 when it has not all arrived ``timeout_s`` after the headers."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_request", "Content-Length is not an integer")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    parts: list[bytes] = []
    size, digest = 0, hashlib.sha256()
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise _too_large(None, limit)
                parts.append(part)
                digest.update(part)
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s; send smaller "
                       "chunks or check the link", headers={"Connection": "close"}) from None
    return parts[0] if len(parts) == 1 else b"".join(parts), digest  # joined once: no growing buffer copied again


def signed_path(request: Request) -> str:
    """The path as the client sent it (raw, percent-encoding kept) plus the query string: what was signed."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


SIGNED_HEADERS = ("host", "content-type", "upload-offset", H_SITE, H_TIME, H_NONCE, H_BODY, H_SIG)


class SiteAuth:
    """Builds the per-route dependencies; shares one replay cache and one bound on bodies held in memory."""

    def __init__(self, ledger: Ledger, replay: ReplayCache, limits: LimitsConfig) -> None:
        self.ledger, self.replay, self.limits = ledger, replay, limits
        self._bodies = asyncio.Semaphore(limits.max_buffered_bodies)

    async def verify_headers(self, request: Request) -> SignedHeaders:
        """Everything but the body: well-formed headers in the time window, a signature by a registered site (an
        unknown site gets the same answer as a wrong key), not revoked, a nonce not seen before."""
        lim = self.limits
        doubled = [h for h in SIGNED_HEADERS if len(request.headers.getlist(h)) > 1]
        if doubled:  # one value each, or the signature and the route could read different ones
            raise ApiError(400, "invalid_request", f"header(s) {', '.join(doubled)} given more than once")
        try:
            signed = read_signed_headers(request.headers, max_skew_s=lim.max_clock_skew_s,
                                         max_future_skew_s=lim.max_future_skew_s)
            row = await run_in_threadpool(self.ledger.site, signed.site)
            verify_signed_headers(request.headers, request.method, signed_path(request),
                                  None if row is None else row.public_key, signed)
        except ShardVerificationError as err:
            raise ApiError(401, err.reason, str(err)) from None
        assert row is not None
        if row.revoked:  # only a request signed with the site's key learns that it is revoked (not when)
            raise ApiError(403, "revoked_site", "this site's key was revoked; contact the coordinator operator")
        await run_in_threadpool(self.replay.record, signed.site, signed.nonce, signed.timestamp)
        return signed

    def dependency(self, body_limit: int) -> Callable[..., AsyncIterator[Authed]]:
        """A FastAPI dependency for a route taking bodies up to ``body_limit`` bytes."""

        async def authenticate(
            request: Request,
            site: str | None = Header(None, alias=H_SITE, description="registered site name"),
            timestamp: str | None = Header(None, alias=H_TIME, description="unix seconds when signed"),
            nonce: str | None = Header(None, alias=H_NONCE, description="32 random hex digits, new per request"),
            body_sha256: str | None = Header(None, alias=H_BODY, description="sha256 hex of the body"),
            signature: str | None = Header(None, alias=H_SIG, description="base64 Ed25519 over the canonical "
                                           "request (privdistill.identity.canonical_request)"),
        ) -> AsyncIterator[Authed]:
            signed = await self.verify_headers(request)
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > body_limit:
                raise _too_large(int(declared), body_limit)  # before waiting for a slot
            try:
                await asyncio.wait_for(self._bodies.acquire(), timeout=self.limits.header_timeout_s)
            except TimeoutError:
                raise ApiError(503, "busy", "the coordinator is receiving too many bodies at once; retry",
                               headers={"Retry-After": "5"}) from None
            try:
                body, digest = await read_body(request, body_limit, timeout_s=self.limits.body_timeout_s)
                try:
                    check_body(signed, digest.hexdigest())
                except ShardVerificationError as err:
                    raise ApiError(401, err.reason, str(err)) from None
                await run_in_threadpool(self.ledger.touch_site, signed.site)
                yield Authed(site=signed.site, body=body, sha256=digest)
            finally:
                self._bodies.release()

        return authenticate
