"""One hardened uvicorn setup for both web servers (the coordinator API and the site review page).

uvicorn alone lets a client hold a connection with headers that never end (httptools has no header size limit;
h11 bounds the size but not the time), keeps a connection alive after an error answer while the client goes on
sending a body nobody reads, and by default believes X-Forwarded-For from 127.0.0.1. Here: the h11 parser with a
header size limit, a deadline for each request's headers, a connection closed soon after any answer sent before
its body was read, a bound on concurrent connections (more are dropped on arrival), and no proxy headers.
Not bounded here: TLS handshakes in progress (asyncio gives each 60 s) and connections per client address; a
firewall or proxy in front is the place for those."""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 16 * 1024
MAX_CONNECTIONS = 128
KEEP_ALIVE_S = 5
DRAIN_S = 2.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header deadline and close-after-unread-body (see the module docstring)."""

    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None
    _drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's own
        super().connection_made(transport)
        self._header_timer = None
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            transport.abort()  # over the limit: dropped on arrival, not held open until its first request
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.abort()  # no answer, no TLS close handshake: a client this slow would hold it open

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are complete
            self._cancel_header_timer()
        drain = self._drain_timer
        if drain is not None and self.conn.their_state is not h11.SEND_BODY:
            drain.cancel()  # the unread body ended in time: close after it (the client has read the answer)
            self._drain_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    def on_response_complete(self) -> None:
        unread = self.conn.their_state is h11.SEND_BODY
        super().on_response_complete()
        if self.transport.is_closing():
            return
        self._arm_header_timer()  # the next request on this connection gets its own deadline
        if unread:
            # answered before the body was read (e.g. 401 before authentication): uvicorn discards the rest of
            # the body for at most DRAIN_S (so the client can read the answer); then, or when it ends, the
            # connection is closed
            self._drain_timer = self.loop.call_later(DRAIN_S, self._drain_too_slow)

    def _drain_too_slow(self) -> None:
        self._drain_timer = None
        if not self.transport.is_closing():
            self.transport.abort()  # the answer went out DRAIN_S ago; a graceful TLS close would wait on the client

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})


def hardened_config(app: Any, *, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                    max_header_bytes: int = MAX_HEADER_BYTES, header_timeout_s: float = HEADER_TIMEOUT_S,
                    **kwargs: Any) -> uvicorn.Config:
    """A uvicorn.Config with the guards above; ``kwargs`` go to uvicorn (TLS files, graceful shutdown ...)."""
    return uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(header_timeout_s),
        h11_max_incomplete_event_size=max_header_bytes, limit_concurrency=max_connections,
        proxy_headers=False, forwarded_allow_ips="", server_header=False, date_header=True,
        timeout_keep_alive=KEEP_ALIVE_S, log_config=None, access_log=False, lifespan="off", **kwargs)
