"""What both web apps mount: their pages rendered over the shared base and login templates, ONE login router (login
form, login, logout, the shared CSS, optionally /healthz) and the exception handlers of the login checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from privdistill import __version__
from privdistill.web.render import PAGES_CSS, environment
from privdistill.web.session import (
    MAX_FORM_BYTES,
    CsrfRejected,
    FormTooLarge,
    LoginRequired,
    Posted,
    Session,
    WebLogin,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Chrome:
    """An app's frame around every page: ``brand`` in bold after "privdistill · ``brand_prefix``", the nav links
    shown once logged in, a banner under the header, a note in the footer, a suffix of every title."""

    brand: str
    brand_prefix: str = ""
    title_suffix: str = ""
    nav: tuple[tuple[str, str], ...] = ()  # (href, label)
    banner: str | None = None
    footer_note: str | None = None


@dataclass(frozen=True)
class LoginTexts:
    """What an app's login form says: the token field's label, the name field's label and default, a hint."""

    token_label: str
    name_label: str
    hint: Markup
    name_default: str = ""
    default_user: Callable[[], str] = field(default=lambda: "admin")  # recorded when the name field is empty


class Pages:
    """An app's pages: its templates over the shared ones, its chrome and login, and ``render`` for its routes."""

    def __init__(self, web: WebLogin, app_templates: Path, chrome: Chrome, login: LoginTexts, *,
                 context: Mapping[str, Any] | None = None) -> None:
        self.web, self.chrome, self.login = web, chrome, login
        self.templates = Jinja2Templates(env=environment(app_templates))
        self.context = dict(context or {})

    @property
    def prefix(self) -> str:
        return self.web.prefix

    def render(self, request: Request, name: str, context: Mapping[str, Any], *, status: int = 200,
               session: Session | None = None) -> HTMLResponse:
        ctx = {**self.context, "chrome": self.chrome, "prefix": self.prefix, "session": session,
               "version": __version__, **context}
        return self.templates.TemplateResponse(request, name, ctx, status_code=status)


def _login_of(request: Request) -> WebLogin:
    login: WebLogin = request.app.state.login  # set by install_login
    return login


def require_user(request: Request) -> Session:
    """Dependency: the logged-in session (LoginRequired otherwise)."""
    return _login_of(request).require_user(request)


async def require_post(request: Request) -> Posted:
    """Dependency of every state-changing POST: logged in and the session's CSRF token in the form."""
    return await _login_of(request).require_post(request)


UserSession = Annotated[Session, Depends(require_user)]
PostedForm = Annotated[Posted, Depends(require_post)]


def install_login(app: FastAPI, pages: Pages, *, event: str, healthz: bool = False) -> None:
    """Mount ``pages``' login on ``app``: the login router, the handlers of the login checks' exceptions, and the
    WebLogin the UserSession / PostedForm dependencies use (one login per app)."""
    app.state.login = pages.web
    add_login_handlers(app, pages.web, event=event)
    app.include_router(login_router(pages, event=event, healthz=healthz))


def login_router(pages: Pages, *, event: str, healthz: bool = False) -> APIRouter:
    """GET/POST {prefix}/login, POST {prefix}/logout, GET {prefix}/static/pages.css and, with ``healthz``,
    GET {prefix}/healthz; ``event`` prefixes the log events ("ui" -> "ui.login")."""
    web, prefix = pages.web, pages.prefix
    router = APIRouter(prefix=prefix, include_in_schema=False)

    def form_page(request: Request, csrf: str, error: str | None, name: str, status: int = 200) -> HTMLResponse:
        return pages.render(request, "login.html", {"csrf": csrf, "error": error, "name_value": name,
                                                    "login": pages.login}, status=status)

    @router.get("/static/pages.css")
    def css() -> FileResponse:
        return FileResponse(str(PAGES_CSS), media_type="text/css")

    if healthz:
        @router.get("/healthz")
        def health() -> JSONResponse:
            return JSONResponse({"status": "ok", "version": __version__})

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        s = web.current(request)
        if s is not None and s.authenticated:
            return RedirectResponse(f"{prefix}/", status_code=303)
        s = s or web.store.anonymous()
        resp = form_page(request, s.csrf, None, pages.login.name_default)
        web.set_cookie(resp, s)
        return resp

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        attempt = await web.login_attempt(request, pages.login.default_user())
        if attempt.session is None:
            log.warning(f"{event}.login_refused", status=attempt.status)
            return form_page(request, attempt.csrf, attempt.error, attempt.form.get("name", ""), attempt.status)
        log.info(f"{event}.login", user=attempt.session.user)
        resp = RedirectResponse(f"{prefix}/", status_code=303)
        web.set_cookie(resp, attempt.session)
        return resp

    @router.post("/logout")
    def logout(posted: PostedForm) -> Response:
        web.store.logout(posted.session.id)
        resp = RedirectResponse(f"{prefix}/login", status_code=303)
        web.clear_cookie(resp)
        return resp

    return router


def add_login_handlers(app: FastAPI, web: WebLogin, *, event: str) -> None:
    """Answers for the login checks' exceptions (raised only by the dependencies of ``web``'s pages): a GET without
    a session goes to the login form, any other request is told so; a bad CSRF token 403; a large form 413."""

    async def refused(request: Request, err: Exception) -> Response:
        if isinstance(err, LoginRequired):
            if request.method in ("GET", "HEAD"):
                return RedirectResponse(f"{web.prefix}/login", status_code=303)
            return PlainTextResponse(f"not logged in: open {web.prefix}/login and enter the access token",
                                     status_code=401)
        if isinstance(err, CsrfRejected):
            log.warning(f"{event}.csrf_rejected", path=request.url.path)
            return PlainTextResponse("missing or wrong CSRF token: reload the page and submit the form again",
                                     status_code=403)
        return PlainTextResponse(f"form larger than {MAX_FORM_BYTES} bytes", status_code=413)

    for exc in (LoginRequired, CsrfRejected, FormTooLarge):
        app.add_exception_handler(exc, refused)
