"""`privdistill-site ui`: serve the review page with uvicorn; the access token comes from a 0600 file or is made now."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from pathlib import Path

import structlog
import uvicorn

from privdistill.errors import RetryableNetworkError
from privdistill.httpserver import hardened_config
from privdistill.web.session import LOOPBACK_HOSTS, new_token, read_token_file
from site_agent.config import SiteConfig
from site_agent.ui.app import create_app

log = structlog.get_logger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_server(cfg: SiteConfig, workdir: Path, *, host: str = "127.0.0.1", port: int = 8765,
                 token: str, allowed_hosts: Iterable[str] = ()) -> uvicorn.Server:
    """The uvicorn server of the review app (warns when it listens beyond loopback). The page answers to the
    loopback names and ``allowed_hosts`` (the names a proxy or browser uses to reach it), nothing else."""
    if not is_loopback(host):
        log.warning("ui.listening_beyond_loopback", host=host,
                    hint="the review page shows real patient images; publish it only on the host's loopback "
                         "(compose: 127.0.0.1:PORT:8765) or behind the hospital's TLS proxy")
    hosts = (*LOOPBACK_HOSTS, *allowed_hosts)
    config = hardened_config(create_app(cfg, workdir, token=token, allowed_hosts=hosts), host=host, port=port,
                             timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve_ui(cfg: SiteConfig, workdir: Path, *, host: str = "127.0.0.1", port: int = 8765,
             token_file: Path | None = None, allowed_hosts: Iterable[str] = ()) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    token = read_token_file(token_file) if token_file is not None else new_token()
    server = build_server(cfg, workdir, host=host, port=port, token=token, allowed_hosts=allowed_hosts)
    shown = f"[{host}]" if ":" in host else host
    print(f"privdistill review page for site {cfg.site.id}: http://{shown}:{port}/login", file=sys.stderr, flush=True)
    if token_file is None:
        print(f"access token (shown once; --token-file FILE to set one): {token}", file=sys.stderr, flush=True)
    else:
        print(f"access token: the one in {token_file}", file=sys.stderr, flush=True)
    try:
        server.run()
    except SystemExit:
        if server.started:  # SIGTERM, re-raised by uvicorn after its graceful shutdown: end as terminated
            raise
        # else uvicorn exited because it could not bind
    if not server.started:
        raise RetryableNetworkError(f"could not serve the review page on {host}:{port} (port in use?); pass --port")
    return 0
