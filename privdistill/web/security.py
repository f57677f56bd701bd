"""The security headers of every page (CSP, no framing, no caching) and, for the site's review page, the Host check
against DNS rebinding: one ASGI middleware both apps install."""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privdistill.web.session import host_of

log = structlog.get_logger(__name__)

# headers for every page that shows images or forms: nothing from elsewhere, no inline script or style, nothing
# cached, no framing
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


class SecurityHeaders:
    """Adds SECURITY_HEADERS (where a response did not set them) to every response under ``prefix`` ("" for all).
    With ``allowed_hosts``, a request whose Host header names another host is answered 421 with ``refusal``."""

    def __init__(self, app: ASGIApp, *, prefix: str = "", allowed_hosts: Iterable[str] | None = None,
                 refusal: str = "this page answers only to its own host names") -> None:
        self.app, self.prefix, self.refusal = app, prefix, refusal
        self.hosts = None if allowed_hosts is None else frozenset(host_of(h) for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _under(scope["path"], self.prefix):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        if self.hosts is not None and host_of(Headers(scope=scope).get("host")) not in self.hosts:
            log.warning("web.host_refused", path=scope["path"])
            await PlainTextResponse(self.refusal, status_code=421)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)
