"""The /admin pages: the shared token login (cookie + CSRF on every POST) and the monitoring page. Not in the API's
OpenAPI schema; mounted only when the config names an admin token file (otherwise /admin is a 404 like any unknown
path)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from coordinator.config import CoordinatorConfig
from coordinator.ledger import Ledger
from coordinator.web.dashboard import build_dashboard
from privdistill.web.pages import Chrome, LoginTexts, Pages, UserSession, install_login
from privdistill.web.security import SecurityHeaders
from privdistill.web.session import SessionStore, WebLogin, read_token_file

log = structlog.get_logger(__name__)

PREFIX = "/admin"
COOKIE = "privdistill_admin"
TEMPLATES = Path(str(files("coordinator.web") / "templates"))
CHROME = Chrome(brand="coordinator", title_suffix="", footer_note="the coordinator holds synthetic shards only, "
                                                                   "never a patient image")
LOGIN = LoginTexts(token_label="Admin token", name_label="Your name", name_default="admin",
                   hint=Markup("The token is in the file named by <code>admin_token_file</code> in coordinator.yaml."))


def mount_admin(app: FastAPI, config: CoordinatorConfig, ledger: Ledger) -> bool:
    """Add the /admin pages to ``app`` when ``config.admin_token_file`` is set (ConfigError if it is unreadable or
    not private); returns whether they were added."""
    if config.admin_token_file is None:
        return False
    web = WebLogin(SessionStore(read_token_file(config.admin_token_file)), cookie=COOKIE, prefix=PREFIX, secure=True)
    pages = Pages(web, TEMPLATES, CHROME, LOGIN)
    app.add_middleware(SecurityHeaders, prefix=PREFIX)
    install_login(app, pages, event="admin")
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    @router.get("", response_class=HTMLResponse)
    @router.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request, session: UserSession) -> Response:
        d = await run_in_threadpool(build_dashboard, config, ledger)
        return pages.render(request, "dashboard.html", {"d": d}, session=session)

    app.include_router(router)
    log.info("admin.enabled", path=PREFIX)
    return True
