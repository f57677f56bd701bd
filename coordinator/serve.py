"""Run the coordinator API over HTTPS with uvicorn (after reconciling staging files with the ledger)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

import structlog
import uvicorn
from fastapi import FastAPI

from coordinator.api import create_app
from coordinator.config import CoordinatorConfig, check_tls_files
from privdistill.errors import RetryableNetworkError
from privdistill.httpserver import hardened_config
from privdistill.procs import end_with_parent

log = structlog.get_logger("coordinator.serve")


def _tls12_or_newer(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    ctx = default()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def build_server(config: CoordinatorConfig, *, host: str | None = None, port: int | None = None,
                 reconcile: bool = True) -> uvicorn.Server:
    """A ready uvicorn.Server for ``config`` (TLS always on); staging is reconciled before it is returned (unless
    ``reconcile`` is False: a worker process, after the parent reconciled)."""
    check_tls_files(config)
    app = create_app(config)
    counts = app.state.uploads.reconcile() if reconcile else {}
    host = host or config.listen.host
    port = config.listen.port if port is None else port
    lim = config.limits
    uv = hardened_config(
        app, host=host, port=port, max_connections=lim.max_connections, max_header_bytes=lim.max_header_bytes,
        header_timeout_s=lim.header_timeout_s, ssl_certfile=str(config.tls.cert), ssl_keyfile=str(config.tls.key),
        ssl_context_factory=_tls12_or_newer, timeout_graceful_shutdown=10,
        parser="httptools", loop="uvloop",  # C parser and event loop (hard dependencies): ~1/3 of h11's CPU per byte
    )
    if reconcile:
        log.info("coordinator_starting", url=f"https://{host}:{port}", state_dir=str(config.state_dir), **counts)
    return uvicorn.Server(uv)


def serve(config: CoordinatorConfig, *, host: str | None = None, port: int | None = None,
          workers: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code. ``workers`` (default ``listen.workers``) processes share
    one listening socket; staging is reconciled once, before any of them starts."""
    server = build_server(config, host=host, port=port)
    where = f"{server.config.host}:{server.config.port}"
    n = config.server_processes(workers)
    if n > 1:
        app = cast(FastAPI, server.config.app)
        app.state.ledger.close()  # no SQLite connection may cross a fork: each worker builds its own app
        app.state.replay.close()
        return _serve_workers(lambda: build_server(config, host=host, port=port, reconcile=False),
                              server.config.host, server.config.port, n, where)
    try:
        server.run()
    except SystemExit:
        if server.started:  # SIGTERM, re-raised by uvicorn after its graceful shutdown: end as terminated
            raise
        # else uvicorn exited because it could not bind
    if not server.started:
        raise RetryableNetworkError(f"could not serve on {where} (port in use or not permitted?); free the port or "
                                    "pass --port")
    return 0


RESTART_BACKOFF_S = 1.0


def _serve_workers(make_server: Callable[[], uvicorn.Server], host: str, port: int, n: int, where: str) -> int:
    """Bind ``n`` SO_REUSEPORT sockets (the kernel spreads connections over them evenly; one shared socket would let
    the first worker to wake accept a whole burst), fork a worker per socket (each builds its own app and server); restart a worker that dies
    (at most once per RESTART_BACKOFF_S each); on SIGINT/SIGTERM pass it on and wait for them all."""
    try:
        socks = _reuseport_sockets(host, port, n)
    except OSError:
        raise RetryableNetworkError(f"could not serve on {where} (port in use or not permitted?); free the port or "
                                    "pass --port") from None
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            _signal(pid, signal.SIGTERM)

    master = os.getpid()

    def _spawn(index: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker: uvicorn installs its own SIGINT/SIGTERM handlers
            code = 0
            try:
                end_with_parent(master)  # a killed master leaves no worker serving on the port
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                for other in socks[:index] + socks[index + 1:]:
                    other.close()
                make_server().run(sockets=[socks[index]])
            except BaseException:  # a worker must never return into the parent's code
                log.exception("coordinator_worker_failed", worker=index)
                code = 1
            finally:
                os._exit(code)
        log.info("coordinator_worker_started", worker=index, pid=pid)
        return pid

    children: dict[int, int] = {}
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(n):
            children[_spawn(i)] = i
        started = {i: time.monotonic() for i in range(n)}
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                continue
            index = children.pop(pid, None)
            if index is None or stopping:
                continue
            log.warning("coordinator_worker_exited", worker=index, pid=pid, status=os.waitstatus_to_exitcode(status))
            time.sleep(max(0.0, RESTART_BACKOFF_S - (time.monotonic() - started[index])))
            if not stopping:
                started[index] = time.monotonic()
                children[_spawn(index)] = index
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pid in list(children):
            _signal(pid, signal.SIGTERM)
        for sock in socks:
            sock.close()
    return 0


def _reuseport_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` listening sockets on (host, port) with SO_REUSEPORT. A plain bind first: it fails if anything, another
    coordinator's SO_REUSEPORT group included, holds the port, so two coordinators never share one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)

