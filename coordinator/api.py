"""The coordinator's HTTP API (FastAPI): health, metrics and the signed, resumable shard upload endpoints."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator import store
from coordinator.audit_log import AuditLog
from coordinator.auth import Authed, SiteAuth
from coordinator.config import CoordinatorConfig
from coordinator.ledger import Ledger
from coordinator.metrics import CONTENT_TYPE_LATEST, Metrics
from coordinator.replay import ReplayCache
from coordinator.schemas import (
    AUTH_ERRORS,
    E404,
    E409,
    E422,
    ApiError,
    CreateUploadRequest,
    ErrorResponse,
    HealthResponse,
    UploadInfo,
)
from coordinator.uploads import Uploads
from coordinator.web.routes import mount_admin
from privdistill import __version__
from privdistill.identity import CHUNK_CONTENT_TYPE, H_UPLOAD_LENGTH, H_UPLOAD_OFFSET, H_UPLOAD_REASON, H_UPLOAD_STATE

_STATUS_REASON = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _upload_headers(info: UploadInfo) -> dict[str, str]:
    headers = {H_UPLOAD_OFFSET: str(info.offset), H_UPLOAD_LENGTH: str(info.size), H_UPLOAD_STATE: info.state,
               "Cache-Control": "no-store"}
    if info.reason:
        headers[H_UPLOAD_REASON] = info.reason
    return headers


def create_app(config: CoordinatorConfig) -> FastAPI:
    """A self-contained app over ``config.state_dir`` (ledger, store, staging, audit log, its own metrics)."""
    store.ensure_layout(config.state_dir)
    ledger = Ledger(config.ledger_path, keep_open=True)
    metrics = Metrics()
    audit = AuditLog(config.state_dir)
    uploads = Uploads(config, ledger, audit, metrics)
    limits = config.limits

    app = FastAPI(title="privdistill coordinator", version=__version__,
                  description="Receives signed, verified synthetic-image shards from sites (protocol v1).")
    app.state.config, app.state.ledger, app.state.metrics, app.state.uploads = config, ledger, metrics, uploads

    replay = ReplayCache(config.state_dir, max_skew_s=limits.max_clock_skew_s,
                         max_future_skew_s=limits.max_future_skew_s, max_per_site=limits.max_requests_per_site,
                         keep_open=True)
    app.state.replay = replay
    auth = app.state.auth = SiteAuth(ledger, replay, limits)
    auth_create = auth.dependency(2 * limits.max_manifest_bytes + 65536)
    auth_chunk = auth.dependency(limits.max_chunk_bytes)
    auth_small = auth.dependency(4096)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        metrics.requests_rejected.labels(reason=err.reason).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return await _api_error(request, ApiError(400, "invalid_request", f"invalid request: {err.errors()[:3]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        reason = _STATUS_REASON.get(err.status_code, f"http_{err.status_code}")
        return await _api_error(request, ApiError(err.status_code, reason, str(err.detail),
                                                  headers=dict(err.headers or {})))

    @app.get("/healthz", response_model=HealthResponse, tags=["ops"])
    def healthz() -> HealthResponse:
        """Liveness: no authentication."""
        return HealthResponse(status="ok", version=__version__)

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    def prometheus() -> Response:
        """Prometheus counters: uploads, bytes, accepted and rejected shards, rejected requests by reason."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    create_body: dict[str, Any] = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": CreateUploadRequest.model_json_schema()}}}}

    @app.post("/v1/uploads", status_code=201, response_model=UploadInfo, tags=["uploads"],
              openapi_extra=create_body,
              responses={200: {"model": UploadInfo, "description": "an open upload of this shard (resume it), or "
                               "the shard was already accepted (duplicate: true)"}, **AUTH_ERRORS, **E422})
    async def create_upload(authed: Authed = Depends(auth_create)) -> JSONResponse:
        """Start (or resume) an upload: the signed manifest is checked before any byte is accepted."""
        info, status = await run_in_threadpool(uploads.create, authed.site, authed.body)
        return JSONResponse(info.model_dump(), status_code=status)

    @app.head("/v1/uploads/{upload_id}", status_code=200, tags=["uploads"], response_class=Response,
              responses={200: {"description": "where to resume", "headers": _doc_headers(
                  H_UPLOAD_OFFSET, H_UPLOAD_LENGTH, H_UPLOAD_STATE)}, **AUTH_ERRORS, **E404})
    async def head_upload(upload_id: str, authed: Authed = Depends(auth_small)) -> Response:
        """Where to resume: the current offset (the staging file is re-aligned with the ledger first)."""
        info = await run_in_threadpool(uploads.status, authed.site, upload_id)
        return Response(status_code=200, headers=_upload_headers(info))

    @app.get("/v1/uploads/{upload_id}", response_model=UploadInfo, tags=["uploads"],
             responses={**AUTH_ERRORS, **E404})
    async def get_upload(upload_id: str, authed: Authed = Depends(auth_small)) -> UploadInfo:
        """State of one of this site's uploads, with the rejection reason if any."""
        return await run_in_threadpool(uploads.status, authed.site, upload_id)

    chunk_body: dict[str, Any] = {"requestBody": {"required": True, "content": {
        CHUNK_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}}}

    @app.patch("/v1/uploads/{upload_id}", status_code=204, response_class=Response, tags=["uploads"],
               openapi_extra=chunk_body,
               responses={204: {"description": "chunk stored; Upload-State receiving | accepted | rejected (then "
                                "Upload-Reason says why)", "headers": _doc_headers(
                                    H_UPLOAD_OFFSET, H_UPLOAD_STATE, H_UPLOAD_REASON)}, **AUTH_ERRORS, **E404, **E409})
    async def patch_upload(
        upload_id: str,
        upload_offset: str | None = Header(None, alias=H_UPLOAD_OFFSET, description="byte offset of this chunk"),
        authed: Authed = Depends(auth_chunk),
    ) -> Response:
        """Append one chunk at the current offset; the last chunk triggers verification of the whole shard."""
        info = await run_in_threadpool(uploads.append, authed.site, upload_id, upload_offset, authed.body,
                                       sha256=authed.sha256)
        headers = _upload_headers(info)
        headers.pop(H_UPLOAD_LENGTH)
        return Response(status_code=204, headers=headers)

    mount_admin(app, config, ledger)  # /admin when config.admin_token_file is set; never in the OpenAPI schema
    app.openapi_tags = [{"name": "uploads", "description": "signed (X-Privdistill-* headers), resumable uploads"}]
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    return app


def _doc_headers(*names: str) -> dict[str, Any]:
    kinds = {H_UPLOAD_OFFSET: "integer", H_UPLOAD_LENGTH: "integer"}
    return {n: {"schema": {"type": kinds.get(n, "string")}} for n in names}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema minus its generic 422 HTTPValidationError: this API answers invalid requests with 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                             tags=app.openapi_tags)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                r422 = op.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(r422):
                    del op["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = \
            ErrorResponse.model_json_schema()
        app.openapi_schema = schema
    return app.openapi_schema
