"""The site's review web app (FastAPI + Jinja2): shard list, shard review with Approve / Reject, audit log, /healthz."""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from privdistill import __version__
from privdistill.errors import ConfigError, PrivacyPolicyError, StageError
from privdistill.shard import ID_PATTERN
from privdistill.websession import (
    LOOPBACK_HOSTS,
    MAX_FORM_BYTES,
    SECURITY_HEADERS,
    CsrfRejected,
    FormTooLarge,
    LoginRequired,
    Posted,
    Session,
    SessionStore,
    WebLogin,
    host_of,
)
from site_agent.approval import approve_shard, reject_shard
from site_agent.audit import operator, read_audit
from site_agent.config import SiteConfig
from site_agent.ui.review import list_shards, shard_view

log = structlog.get_logger(__name__)

HERE = files("site_agent.ui")
AUDIT_FIELDS = ("reason", "by", "destination", "sample_count", "upload_id", "detail")
COOKIE = "privdistill_review"


def _templates() -> Jinja2Templates:
    t = Jinja2Templates(directory=str(HERE / "templates"))
    t.env.autoescape = True
    return t


def create_app(cfg: SiteConfig, workdir: Path, *, token: str, allowed_hosts: Iterable[str] = LOOPBACK_HOSTS) -> FastAPI:
    """The review app over one site work directory; ``token`` is the access token the login form asks for;
    requests whose Host header names another host than ``allowed_hosts`` are refused (DNS rebinding)."""
    workdir = Path(workdir)
    hosts = frozenset(host_of(h) for h in allowed_hosts)
    app = FastAPI(title="privdistill site review", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    web = app.state.login = WebLogin(SessionStore(token), cookie=COOKIE)
    templates = _templates()

    def user(request: Request) -> Session:
        return web.require_user(request)

    async def post(request: Request) -> Posted:
        return await web.require_post(request)

    def page(request: Request, name: str, context: dict[str, Any], *, status: int = 200,
             session: Session | None = None) -> HTMLResponse:
        ctx = {"site_id": cfg.site.id, "session": session, "version": __version__, **context}
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        if host_of(request.headers.get("host")) not in hosts:
            log.warning("ui.host_refused")
            response: Response = PlainTextResponse(
                "this page answers only to its own host names (pass --allowed-host NAME to `privdistill-site ui` "
                "for a name other than localhost)", status_code=421)
        else:
            response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _: LoginRequired) -> Response:
        if request.method in ("GET", "HEAD"):
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("not logged in: open /login and enter the access token", status_code=401)

    @app.exception_handler(CsrfRejected)
    async def _csrf(request: Request, _: CsrfRejected) -> Response:
        log.warning("ui.csrf_rejected", path=request.url.path)
        return PlainTextResponse("missing or wrong CSRF token: reload the page and submit the form again",
                                 status_code=403)

    @app.exception_handler(FormTooLarge)
    async def _too_large(request: Request, _: FormTooLarge) -> Response:
        return PlainTextResponse(f"form larger than {MAX_FORM_BYTES} bytes", status_code=413)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/static/pages.css")
    def css() -> FileResponse:
        return FileResponse(str(files("privdistill") / "static" / "pages.css"), media_type="text/css")

    # ------------------------------------------------------------------ login
    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        s = web.current(request)
        if s is not None and s.authenticated:
            return RedirectResponse("/", status_code=303)
        s = s or web.store.anonymous()
        resp = page(request, "login.html", {"csrf": s.csrf, "error": None, "default_name": ""})
        web.set_cookie(resp, s)
        return resp

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        new, form, error, status = await web.login_attempt(request, operator())
        if new is None:
            log.warning("ui.login_refused", status=status)
            csrf = web.current(request).csrf  # type: ignore[union-attr]  # login_attempt checked it
            return page(request, "login.html", {"csrf": csrf, "error": error,
                                                "default_name": form.get("name", "")}, status=status)
        log.info("ui.login", user=new.user)
        resp = RedirectResponse("/", status_code=303)
        web.set_cookie(resp, new)
        return resp

    @app.post("/logout")
    def logout(request: Request, posted: Posted = Depends(post)) -> Response:
        web.store.logout(posted.session.id)
        resp = RedirectResponse("/login", status_code=303)
        web.clear_cookie(resp)
        return resp

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, session: Session = Depends(user)) -> Response:
        return page(request, "shards.html", {"rows": list_shards(workdir)}, session=session)

    def _shard_page(request: Request, session: Session, shard_id: str, *, page_no: int = 1,
                    error: str | None = None, status: int = 200) -> Response:
        if not re.fullmatch(ID_PATTERN, shard_id):
            return PlainTextResponse("no such shard", status_code=404)
        try:
            view = shard_view(cfg, workdir, shard_id, page=page_no)
        except StageError:
            return PlainTextResponse("no such shard", status_code=404)
        return page(request, "shard.html", {"v": view, "error": error, "by": f"ui:{session.user}"},
                    status=status, session=session)

    @app.get("/shards/{shard_id}", response_class=HTMLResponse)
    def shard(request: Request, shard_id: str, page: int = 1,
              session: Session = Depends(user)) -> Response:
        return _shard_page(request, session, shard_id, page_no=page)

    def _decide(request: Request, posted: Posted, shard_id: str, action: str) -> Response:
        by = f"ui:{posted.session.user}"
        try:
            if action == "approve":
                approve_shard(workdir, shard_id, by=by)
            else:
                reject_shard(workdir, shard_id, reason=posted.form.get("reason", ""), by=by)
        except StageError:
            return PlainTextResponse("no such shard", status_code=404)
        except (PrivacyPolicyError, ConfigError) as err:
            msg = "; ".join(err.problems) if isinstance(err, ConfigError) else str(err)
            return _shard_page(request, posted.session, shard_id, error=msg,
                               status=400 if isinstance(err, ConfigError) else 409)
        log.info("ui.decided", action=action, shard_id=shard_id, by=by)
        return RedirectResponse(f"/shards/{shard_id}", status_code=303)

    @app.post("/shards/{shard_id}/approve")
    def approve(request: Request, shard_id: str, posted: Posted = Depends(post)) -> Response:
        return _decide(request, posted, shard_id, "approve")

    @app.post("/shards/{shard_id}/reject")
    def reject(request: Request, shard_id: str, posted: Posted = Depends(post)) -> Response:
        return _decide(request, posted, shard_id, "reject")

    @app.get("/audit", response_class=HTMLResponse)
    def audit_log(request: Request, session: Session = Depends(user)) -> Response:
        records = list(reversed(read_audit(workdir)))
        rows = [{**r, "details": {k: r[k] for k in AUDIT_FIELDS if r.get(k) not in (None, "")}} for r in records]
        return page(request, "audit.html", {"records": rows}, session=session)

    return app
