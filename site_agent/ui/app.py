"""The site's review web app (FastAPI + Jinja2): shard list, shard review with Approve / Reject, audit log, /healthz."""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from markupsafe import Markup

from privdistill import __version__
from privdistill.errors import ConfigError, PrivacyPolicyError, StageError
from privdistill.shard import ID_PATTERN
from privdistill.web.pages import Chrome, LoginTexts, Pages, PostedForm, UserSession, install_login
from privdistill.web.security import SecurityHeaders
from privdistill.web.session import LOOPBACK_HOSTS, Posted, Session, SessionStore, WebLogin
from site_agent.approval import approve_shard, reject_shard
from site_agent.audit_log import operator, read_audit
from site_agent.config import SiteConfig
from site_agent.ui.review import list_shards, shard_view

log = structlog.get_logger(__name__)

TEMPLATES = Path(str(files("site_agent.ui") / "templates"))
AUDIT_FIELDS = ("reason", "by", "destination", "sample_count", "upload_id", "detail")
COOKIE = "privdistill_review"
LOGIN = LoginTexts(
    token_label="Access token",
    name_label="Your name (recorded in the audit log as ui:NAME; empty: the account running the page)",
    hint=Markup("The token was printed when <code>privdistill-site ui</code> started, or is in its "
                "<code>--token-file</code>."),
    default_user=operator)
HOST_REFUSAL = ("this page answers only to its own host names (pass --allowed-host NAME to `privdistill-site ui` "
                "for a name other than localhost)")


def create_app(cfg: SiteConfig, workdir: Path, *, token: str, allowed_hosts: Iterable[str] = LOOPBACK_HOSTS) -> FastAPI:
    """The review app over one site work directory; ``token`` is the access token the login form asks for;
    requests whose Host header names another host than ``allowed_hosts`` are refused (DNS rebinding)."""
    workdir = Path(workdir)
    app = FastAPI(title="privdistill site review", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(SecurityHeaders, allowed_hosts=allowed_hosts, refusal=HOST_REFUSAL)
    chrome = Chrome(brand=cfg.site.id, brand_prefix="site ", title_suffix=f"site {cfg.site.id}",
                    nav=(("/", "Shards"), ("/audit", "Audit log")),
                    banner="Inside the site only: this page may show real patient images. Nothing here is exported "
                           "except an approved shard.")
    pages = Pages(WebLogin(SessionStore(token), cookie=COOKIE), TEMPLATES, chrome, LOGIN, context={"site_id": cfg.site.id})
    page = pages.render
    install_login(app, pages, event="ui", healthz=True)

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, session: UserSession) -> Response:
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
    def shard(request: Request, shard_id: str, session: UserSession, page: int = 1) -> Response:
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
    def approve(request: Request, shard_id: str, posted: PostedForm) -> Response:
        return _decide(request, posted, shard_id, "approve")

    @app.post("/shards/{shard_id}/reject")
    def reject(request: Request, shard_id: str, posted: PostedForm) -> Response:
        return _decide(request, posted, shard_id, "reject")

    @app.get("/audit", response_class=HTMLResponse)
    def audit_log(request: Request, session: UserSession) -> Response:
        records = list(reversed(read_audit(workdir)))
        rows = [{**r, "details": {k: r[k] for k in AUDIT_FIELDS if r.get(k) not in (None, "")}} for r in records]
        return page(request, "audit.html", {"records": rows}, session=session)

    return app
