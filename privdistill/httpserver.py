"""One hardened uvicorn setup for both web servers (the coordinator API and the site review page).

uvicorn alone lets a client hold a connection with headers that never end (httptools has no header size limit;
h11 bounds the size but not the time), keeps a connection alive after an error answer while the client goes on
sending a body nobody reads, and by default believes X-Forwarded-For from 127.0.0.1. Here: a header size limit, a
deadline for each request's headers, a connection closed soon after any answer sent before its body was read, a
bound on concurrent connections (more are dropped on arrival), and no proxy headers. Two parsers carry the same
guards: h11 (pure Python; bounds the header size itself) and httptools (llhttp, C: ~3x less CPU per request body
byte; the head's size is bounded here by feeding the parser at most the remaining header allowance while a head is
incomplete). The coordinator, which receives shard bodies, uses httptools; the site review page h11.
Not bounded here: TLS handshakes in progress (asyncio gives each 60 s) and connections per client address; a
firewall or proxy in front is the place for those."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 16 * 1024
MAX_CONNECTIONS = 128
KEEP_ALIVE_S = 5
DRAIN_S = 2.0


class _Deadlines:
    """What both guarded protocols share: the drop on arrival over the connection limit, the header deadline and the
    drain deadline, both timers cancelled when the connection is lost. Mixed in before uvicorn's protocol class."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    limit_concurrency: int | None
    connections: set[Any]
    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None
    _drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]  # uvicorn's protocol, next in the MRO
        self._header_timer = None
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            self.transport.abort()  # over the limit: dropped on arrival, not held open until its first request
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]  # uvicorn's protocol, next in the MRO

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

    def _drain_too_slow(self) -> None:
        self._drain_timer = None
        if not self.transport.is_closing():
            self.transport.abort()  # the answer went out DRAIN_S ago; a graceful TLS close would wait on the client


class GuardedH11Protocol(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol plus a header deadline and close-after-unread-body (see the module docstring)."""

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


class GuardedHttpToolsProtocol(_Deadlines, HttpToolsProtocol):
    """uvicorn's httptools protocol plus the same guards: a head (request line and headers) over
    ``max_header_bytes`` is answered 431 and the connection closed, a header deadline, close-after-unread-body."""

    max_header_bytes = MAX_HEADER_BYTES
    _head_left: int | None = None  # bytes a head may still take; None while a body is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._head_left = self.max_header_bytes
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """While a head is incomplete the parser is fed at most the bytes it may still take, so a head longer than
        ``max_header_bytes`` is refused whatever the read size; a body goes in whole. (A pipelined request's head that
        follows a body in the same read is bounded by that read; uvicorn then pauses reading.)"""
        if self._head_left is None:
            super().data_received(data)
            return
        view = memoryview(data)
        while view:
            left = self._head_left
            if left is not None and left <= 0:  # the head took its allowance and has not ended
                self._head_too_large()
                return
            piece = view if left is None else view[:left]
            view = view[len(piece):]
            if left is not None:
                self._head_left = left - len(piece)  # None again if the head ends inside this piece
            super().data_received(piece)  # type: ignore[arg-type]  # httptools reads any buffer
            if self.parser is None or self.transport.is_closing():
                return

    def _head_too_large(self) -> None:
        self._cancel_header_timer()
        msg = b"Request header fields too large"
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(msg), msg))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_left = None
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_left = self.max_header_bytes  # the next request's head
        drain = self._drain_timer
        if drain is not None:
            drain.cancel()  # the unread body ended in time: close after it (the client has read the answer)
            self._drain_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    def on_response_complete(self) -> None:
        unread = self.cycle is not None and self.cycle.more_body  # answered before the body's end arrived
        super().on_response_complete()
        if self.transport.is_closing():
            return
        self._arm_header_timer()
        if unread:  # as GuardedH11Protocol: discarded for at most DRAIN_S, then (or when it ends) closed
            self._drain_timer = self.loop.call_later(DRAIN_S, self._drain_too_slow)


GUARDED_PROTOCOLS = (GuardedH11Protocol, GuardedHttpToolsProtocol)
Parser = Literal["h11", "httptools"]


def guarded_protocol(header_timeout_s: float, parser: Parser = "h11",
                     max_header_bytes: int = MAX_HEADER_BYTES) -> type[GuardedH11Protocol | GuardedHttpToolsProtocol]:
    base = {"h11": GuardedH11Protocol, "httptools": GuardedHttpToolsProtocol}[parser]
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})


def hardened_config(app: Any, *, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                    max_header_bytes: int = MAX_HEADER_BYTES, header_timeout_s: float = HEADER_TIMEOUT_S,
                    parser: Parser = "h11", **kwargs: Any) -> uvicorn.Config:
    """A uvicorn.Config with the guards above and the given ``parser``; ``kwargs`` go to uvicorn (TLS files,
    the event loop, graceful shutdown ...)."""
    return uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(header_timeout_s, parser, max_header_bytes),
        h11_max_incomplete_event_size=max_header_bytes, limit_concurrency=max_connections,
        proxy_headers=False, forwarded_allow_ips="", server_header=False, date_header=True,
        timeout_keep_alive=KEEP_ALIVE_S, log_config=None, access_log=False, lifespan="off", **kwargs)
