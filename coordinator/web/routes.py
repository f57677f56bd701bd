"""The /admin router: token login (cookie + CSRF on every POST) and the monitoring page. Not in the API's OpenAPI
schema; mounted only when the config names an admin token file (otherwise /admin is a 404 like any unknown path)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from coordinator.config import CoordinatorConfig
from coordinator.ledger import Ledger
from coordinator.web.dashboard import build_dashboard
from privdistill import __version__
from privdistill.websession import (
    SECURITY_HEADERS,
    CsrfRejected,
    FormTooLarge,
    LoginRequired,
    Posted,
    Session,
    SessionStore,
    WebLogin,
    read_token_file,
)

log = structlog.get_logger(__name__)

PREFIX = "/admin"
COOKIE = "privdistill_admin"
HERE = files("coordinator.web")


def _secure(resp: Response) -> Response:
    for k, v in SECURITY_HEADERS.items():
        resp.headers.setdefault(k, v)
    return resp


def mount_admin(app: FastAPI, config: CoordinatorConfig, ledger: Ledger) -> bool:
    """Add the /admin pages to ``app`` when ``config.admin_token_file`` is set (ConfigError if it is unreadable or
    not private); returns whether they were added."""
    if config.admin_token_file is None:
        return False
    web = WebLogin(SessionStore(read_token_file(config.admin_token_file)), cookie=COOKIE, path=PREFIX, secure=True)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def page(request: Request, name: str, context: dict[str, Any], *, status: int = 200,
             session: Session | None = None) -> Response:
        ctx = {"session": session, "version": __version__, "prefix": PREFIX, **context}
        return _secure(templates.TemplateResponse(request, name, ctx, status_code=status))

    def user(request: Request) -> Session:
        return web.require_user(request)

    async def post(request: Request) -> Posted:
        return await web.require_post(request)

    async def refused(request: Request, err: Exception) -> Response:
        if isinstance(err, LoginRequired):
            if request.method in ("GET", "HEAD"):
                return _secure(RedirectResponse(f"{PREFIX}/login", status_code=303))
            return _secure(PlainTextResponse("not logged in: open /admin/login", status_code=401))
        if isinstance(err, CsrfRejected):
            log.warning("admin.csrf_rejected", path=request.url.path)
            return _secure(PlainTextResponse("missing or wrong CSRF token: reload the page", status_code=403))
        return _secure(PlainTextResponse("form too large", status_code=413))

    for exc in (LoginRequired, CsrfRejected, FormTooLarge):  # raised only by the admin routes' dependencies
        app.add_exception_handler(exc, refused)

    @router.get("/static/pages.css")
    def shared_css() -> Response:
        return _secure(FileResponse(str(files("privdistill") / "static" / "pages.css"), media_type="text/css"))

    @router.get("/static/admin.css")
    def css() -> Response:
        return _secure(FileResponse(str(HERE / "static" / "admin.css"), media_type="text/css"))

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        s = web.current(request)
        if s is not None and s.authenticated:
            return _secure(RedirectResponse(f"{PREFIX}/", status_code=303))
        s = s or web.store.anonymous()
        resp = page(request, "login.html", {"csrf": s.csrf, "error": None})
        web.set_cookie(resp, s)
        return resp

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        new, _, error, status = await web.login_attempt(request, "admin")
        if new is None:
            log.warning("admin.login_refused", status=status)
            csrf = web.current(request).csrf  # type: ignore[union-attr]  # login_attempt checked it
            return page(request, "login.html", {"csrf": csrf, "error": error}, status=status)
        log.info("admin.login", user=new.user)
        resp = _secure(RedirectResponse(f"{PREFIX}/", status_code=303))
        web.set_cookie(resp, new)
        return resp

    @router.post("/logout")
    def logout(request: Request, posted: Posted = Depends(post)) -> Response:
        web.store.logout(posted.session.id)
        resp = _secure(RedirectResponse(f"{PREFIX}/login", status_code=303))
        web.clear_cookie(resp)
        return resp

    @router.get("", response_class=HTMLResponse)
    @router.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request, session: Session = Depends(user)) -> Response:
        d = await run_in_threadpool(build_dashboard, config, ledger)
        return page(request, "dashboard.html", {"d": d}, session=session)

    app.include_router(router)
    log.info("admin.enabled", path=PREFIX)
    return True
