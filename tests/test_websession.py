"""The login pages under attack (TestClient, no model): anonymous floods cannot evict a steward's login form, wrong
tokens back off without locking out the right one, X-Forwarded-For is not believed, the review page answers only to
its own host names and does not show the OS user."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from privdistill.web.session import SessionStore, host_of

TOKEN = "site-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def review_client(tmp_path: Path, base_url: str = "http://127.0.0.1", **kw) -> TestClient:
    from site_agent.ui.app import create_app

    cfg = SimpleNamespace(site=SimpleNamespace(id="site-a"))  # the login page needs only the site's name
    return TestClient(create_app(cfg, tmp_path, token=TOKEN, **kw), base_url=base_url)  # type: ignore[arg-type]  # a stand-in config


def admin_client(tmp_path: Path) -> TestClient:
    from coordinator.api import create_app
    from coordinator.config import CoordinatorConfig

    token = tmp_path / "admin_token"
    token.write_text(ADMIN_TOKEN + "\n")
    token.chmod(0o600)
    cfg = CoordinatorConfig(tls={"cert": tmp_path / "x.pem", "key": tmp_path / "x.key"}, state_dir=tmp_path / "state",
                            admin_token_file=token)
    return TestClient(create_app(cfg), base_url="https://127.0.0.1")


def post_login(c: TestClient, prefix: str, csrf: str, token: str, **headers: str):
    return c.post(f"{prefix}/login", data={"csrf": csrf, "token": token, "name": "ops"}, headers=headers,
                  follow_redirects=False)


def test_a_flood_of_anonymous_visitors_cannot_evict_an_open_login_form(tmp_path: Path) -> None:
    c = admin_client(tmp_path)
    form = c.get("/admin/login")
    csrf = csrf_of(form.text)
    flood = TestClient(c.app, base_url="https://127.0.0.1")
    for _ in range(1001):
        flood.cookies.clear()
        assert flood.get("/admin/login").status_code == 200
    r = post_login(c, "/admin", csrf, ADMIN_TOKEN)
    assert r.status_code == 303 and r.headers["location"] == "/admin/"
    assert c.get("/admin/", follow_redirects=False).status_code == 200


def test_anonymous_sessions_are_not_stored_and_expire() -> None:
    store = SessionStore(TOKEN, max_sessions=2)
    anon = [store.anonymous() for _ in range(500)]
    assert store._sessions == {}  # nothing to evict
    assert store.get(anon[0].id).csrf == anon[0].csrf and not store.get(anon[0].id).authenticated
    forged = anon[0].id.replace("a.", "a.1", 1)
    assert store.get(forged) is None or store.get(forged).csrf != anon[0].csrf
    old = f"a.{int(time.time()) - 7200}.x"
    assert store.get(old) is None  # a login form older than an hour is void
    assert SessionStore(TOKEN).get(anon[0].id).csrf != anon[0].csrf  # per-process key: a restart voids them


def test_wrong_tokens_back_off_but_the_right_token_still_logs_in(tmp_path: Path) -> None:
    c = review_client(tmp_path)
    csrf = csrf_of(c.get("/login").text)
    codes = [post_login(c, "", csrf, f"wrong-{i:02d}-xxxxxxxxxxxxxxx").status_code for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    t0 = time.monotonic()
    r = post_login(c, "", csrf, TOKEN)
    assert r.status_code == 303, "the token holder is never locked out"
    assert 0.4 <= time.monotonic() - t0 < 4.5  # ... but waits the back-off (0.25 s doubling: 0.5 s after 12)


def test_x_forwarded_for_does_not_reset_the_throttle(tmp_path: Path) -> None:
    c = review_client(tmp_path)
    codes = []
    for i in range(11):
        c.cookies.clear()  # a new session per attempt too: the client address still counts
        csrf = csrf_of(c.get("/login").text)
        codes.append(post_login(c, "", csrf, f"wrong-{i:02d}-xxxxxxxxxxxxxxx",
                                **{"X-Forwarded-For": f"10.9.{i}.1", "X-Real-IP": f"10.9.{i}.1"}).status_code)
    assert codes == [401] * 10 + [429]


def test_servers_do_not_trust_proxy_headers_and_bound_headers_and_connections() -> None:
    from privdistill.httpserver import GuardedH11Protocol, GuardedHttpToolsProtocol, hardened_config

    cfg = hardened_config(lambda *a: None, host="127.0.0.1", port=0)
    assert cfg.proxy_headers is False and cfg.limit_concurrency == 128
    assert cfg.h11_max_incomplete_event_size == 16384 and issubclass(cfg.http, GuardedH11Protocol)
    fast = hardened_config(lambda *a: None, host="127.0.0.1", port=0, parser="httptools", max_header_bytes=4096)
    assert issubclass(fast.http, GuardedHttpToolsProtocol) and fast.http.max_header_bytes == 4096


@pytest.mark.parametrize("host,ok", [("127.0.0.1:8765", True), ("localhost:8765", True), ("[::1]:8765", True),
                                     ("LOCALHOST", True), ("attacker.example:8765", False),
                                     ("127.0.0.1.attacker.example", False), ("", False)])
def test_review_page_answers_only_to_loopback_host_names(tmp_path: Path, host: str, ok: bool) -> None:
    c = review_client(tmp_path)
    r = c.get("/login", headers={"Host": host})
    assert r.status_code == (200 if ok else 421), host
    if not ok:
        assert "allowed-host" in r.text and "csrf" not in r.text and "set-cookie" not in r.headers


def test_review_page_allowed_hosts_are_configurable(tmp_path: Path) -> None:
    c = review_client(tmp_path, base_url="http://review.hospital.local", allowed_hosts=["review.hospital.local"])
    assert c.get("/login").status_code == 200
    assert c.get("/login", headers={"Host": "127.0.0.1"}).status_code == 421  # the list replaces the default


def test_login_page_does_not_show_the_os_user(tmp_path: Path) -> None:
    import getpass

    from site_agent.audit_log import operator

    html = review_client(tmp_path).get("/login").text
    for name in {operator(), getpass.getuser()}:
        assert not re.search(rf"value=\"{re.escape(name)}\"", html), name
    assert 'name="name" value=""' in html


def test_host_of() -> None:
    assert [host_of(h) for h in ("A.b:1", "[::1]:80", "::1", "x", None)] == ["a.b", "::1", "::1", "x", ""]


def test_both_servers_are_built_with_the_guards(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorConfig
    from coordinator.serve import build_server as coordinator_server
    from privdistill.httpserver import GUARDED_PROTOCOLS, GuardedHttpToolsProtocol
    from site_agent.ui.server import build_server as review_server

    for name in ("x.pem", "x.key"):
        (tmp_path / name).write_text("not read before serving")
    cfg = CoordinatorConfig(tls={"cert": tmp_path / "x.pem", "key": tmp_path / "x.key"}, state_dir=tmp_path / "state",
                            limits={"max_connections": 64, "header_timeout_s": 3})
    site_cfg: Any = SimpleNamespace(site=SimpleNamespace(id="site-a"))
    for server, conns, timeout in ((coordinator_server(cfg, host="127.0.0.1", port=0), 64, 3),
                                   (review_server(site_cfg, tmp_path, port=0, token=TOKEN), 128, 10)):
        c = server.config
        assert (c.proxy_headers, c.limit_concurrency, c.h11_max_incomplete_event_size) == (False, conns, 16384)
        assert issubclass(c.http, GUARDED_PROTOCOLS) and c.http.header_timeout_s == timeout
    assert issubclass(coordinator_server(cfg, host="127.0.0.1", port=0).config.http, GuardedHttpToolsProtocol)
