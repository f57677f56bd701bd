"""Wire models of the coordinator API (request, responses, errors) and the error type routes raise."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Status of every reason code the API can answer with (see the protocol document).
AUTH_REASONS = ("bad_signature", "missing_auth_headers", "expired_timestamp", "body_hash_mismatch",
                "bad_timestamp", "replayed_request")


class ApiError(Exception):
    """An error answer: HTTP ``status``, machine ``reason`` code, human ``detail`` saying what to do."""

    def __init__(self, status: int, reason: str, detail: str, *, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.reason, "detail": self.detail, **self.extra}


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable reason code, e.g. bad_signature, offset_mismatch")
    detail: str = Field(description="what went wrong and what to do")
    offset: int | None = Field(None, description="current offset (offset_mismatch only)")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str


class CreateUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description="the shard's manifest.json, exactly as signed")
    signature: str = Field(description="the shard's manifest.sig (base64 Ed25519)")


class UploadInfo(BaseModel):
    upload_id: str
    state: Literal["receiving", "accepted", "rejected"]
    offset: int = Field(ge=0)
    size: int = Field(ge=1)
    shard_sha256: str
    reason: str | None = None
    duplicate: bool = False


Responses = dict[int | str, dict[str, Any]]  # FastAPI's `responses=` type: status code -> OpenAPI fields


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


E400: Responses = {400: _err("invalid request (missing/invalid Upload-Offset header or request body)")}
E401: Responses = {401: _err("authentication failed: " + " | ".join(AUTH_REASONS))}
E403: Responses = {403: _err("revoked_site: the site's key was revoked (answered only to a correctly signed request)")}
E408: Responses = {408: _err("body_timeout: the body did not arrive in time")}
E429: Responses = {429: _err("too_many_requests | too_many_open_uploads | open_bytes_quota: a per-site quota")}
E503: Responses = {503: _err("busy: too many requests at once; retry after Retry-After")}
E404: Responses = {404: _err("unknown_upload: no such upload for this site")}
E409: Responses = {409: _err("offset_mismatch: Upload-Offset is not the current offset (returned in `offset`)")}
E413: Responses = {413: _err("request_too_large (body or chunk over the limit) | shard_too_large (tar_size over the limit)")}
E422: Responses = {422: _err("malformed_manifest | bad_manifest_signature | site_mismatch | other shard verification reason")}
AUTH_ERRORS: Responses = {**E400, **E401, **E403, **E408, **E413, **E429, **E503}
