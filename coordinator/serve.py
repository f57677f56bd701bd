"""Run the coordinator API over HTTPS with uvicorn (after reconciling staging files with the ledger)."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import structlog
import uvicorn

from coordinator.api import create_app
from coordinator.config import CoordinatorConfig, check_tls_files
from privdistill.errors import RetryableNetworkError
from privdistill.httpserver import hardened_config

log = structlog.get_logger("coordinator.serve")


def _tls12_or_newer(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    ctx = default()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def build_server(config: CoordinatorConfig, *, host: str | None = None, port: int | None = None) -> uvicorn.Server:
    """A ready uvicorn.Server for ``config`` (TLS always on); staging is reconciled before it is returned."""
    check_tls_files(config)
    app = create_app(config)
    counts = app.state.uploads.reconcile()
    host = host or config.listen.host
    port = config.listen.port if port is None else port
    lim = config.limits
    uv = hardened_config(
        app, host=host, port=port, max_connections=lim.max_connections, max_header_bytes=lim.max_header_bytes,
        header_timeout_s=lim.header_timeout_s, ssl_certfile=str(config.tls.cert), ssl_keyfile=str(config.tls.key),
        ssl_context_factory=_tls12_or_newer, timeout_graceful_shutdown=10,
    )
    log.info("coordinator_starting", url=f"https://{host}:{port}", state_dir=str(config.state_dir), **counts)
    return uvicorn.Server(uv)


def serve(config: CoordinatorConfig, *, host: str | None = None, port: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    server = build_server(config, host=host, port=port)
    where = f"{server.config.host}:{server.config.port}"
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        server.started = False
    if not server.started:
        raise RetryableNetworkError(f"could not serve on {where} (port in use or not permitted?); free the port or "
                                    "pass --port")
    return 0
