"""Access-token login for the review pages: the token file, server-side sessions with a per-session CSRF token, a
login throttle, and the checks routes depend on (duck-typed requests: site_agent.ui and coordinator.web share it)."""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from privdistill.errors import ConfigError
from privdistill.identity import loose_mode

MIN_TOKEN_CHARS = 16
SESSION_TTL_S = 8 * 3600
MAX_SESSIONS = 1000
LOGIN_FAILURES_PER_MINUTE = 10


def new_token() -> str:
    """A fresh random access token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def read_token_file(path: Path) -> str:
    """The access token in ``path``; refuses a file that group or others can read (like a site key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"token file {path} does not exist (write a long random token into it, mode 0600)"])
    if (mode := loose_mode(path)) is not None:
        raise ConfigError([f"token file {path} has mode {mode:o}: others can read it; run `chmod 600 {path}`"])
    token = path.read_text(encoding="utf-8", errors="replace").strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError([f"token file {path} must hold one token of at least {MIN_TOKEN_CHARS} characters without "
                           "spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"])
    return token


def same(a: str | None, b: str | None) -> bool:
    """Constant-time string comparison (False when either is missing)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass
class Session:
    """One browser's session: ``user`` is None until it logged in with the token."""

    id: str
    csrf: str
    user: str | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def authenticated(self) -> bool:
        return self.user is not None


class SessionStore:
    """In-memory sessions (a restart logs everyone out) keyed by a random id held in an HttpOnly cookie."""

    def __init__(self, token: str, *, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self._token = token
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, deque[float]] = {}  # wrong tokens per client address
        self._lock = threading.Lock()

    def check_token(self, candidate: str | None) -> bool:
        return same(candidate, self._token)

    def _new(self, user: str | None) -> Session:
        s = Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), user=user)
        with self._lock:
            self._expire()
            while len(self._sessions) >= self.max_sessions:  # oldest anonymous sessions go first
                victim = min(self._sessions.values(), key=lambda x: (x.authenticated, x.created))
                del self._sessions[victim.id]
            self._sessions[s.id] = s
        return s

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        for sid in [k for k, v in self._sessions.items() if v.created < cutoff]:
            del self._sessions[sid]

    def anonymous(self) -> Session:
        """A not-yet-logged-in session: it carries the CSRF token the login form posts back."""
        return self._new(None)

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            self._expire()
            return self._sessions.get(sid)

    def login(self, previous: Session | None, user: str) -> Session:
        """A new authenticated session (a new id: a session id known before login is worth nothing after)."""
        if previous is not None:
            self.logout(previous.id)
        return self._new(user)

    def logout(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    @staticmethod
    def csrf_ok(session: Session | None, submitted: str | None) -> bool:
        return session is not None and same(submitted, session.csrf)

    def login_allowed(self, client: str) -> bool:
        """False after too many wrong tokens from this client address in the last minute (guessing a 256-bit
        token is hopeless anyway); per address, so one noisy client cannot lock the operator out."""
        with self._lock:
            cutoff = time.monotonic() - 60
            for addr in list(self._failures):
                q = self._failures[addr]
                while q and q[0] < cutoff:
                    q.popleft()
                if not q:
                    del self._failures[addr]
            return len(self._failures.get(client, ())) < LOGIN_FAILURES_PER_MINUTE

    def login_failed(self, client: str) -> None:
        with self._lock:
            if client not in self._failures and len(self._failures) >= self.max_sessions:
                self._failures.pop(next(iter(self._failures)))  # bounded memory: forget the oldest address
            self._failures.setdefault(client, deque()).append(time.monotonic())


# headers for every page that shows images or forms: nothing from elsewhere, nothing cached, no framing
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ----------------------------------------------------------------------------- request glue (duck-typed: any
# ASGI framework's request with .cookies, .headers and async .stream(); site_agent.ui and coordinator.web use starlette)
MAX_FORM_BYTES = 16 * 1024
NAME_PATTERN = r"[A-Za-z0-9._@-]{1,64}"


class LoginRequired(Exception):
    """No logged-in session: a GET goes to the login page, anything else is answered 401."""


class CsrfRejected(Exception):
    """A POST without this session's CSRF token: 403."""


class FormTooLarge(Exception):
    """A form body over MAX_FORM_BYTES: 413."""


@dataclass
class Posted:
    """A state-changing POST that passed the checks: its session and its form fields."""

    session: Session
    form: dict[str, str]


def valid_name(name: str) -> bool:
    """A user name fit for the audit log (``ui:NAME``)."""
    return re.fullmatch(NAME_PATTERN, name) is not None


async def read_form(request: Any) -> dict[str, str]:
    """An application/x-www-form-urlencoded body (first value of each field), bounded in size."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
        raise FormTooLarge()
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge()
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=20)
    return {k: v[0] for k, v in parsed.items()}


class WebLogin:
    """One app's login: its session store, its cookie (name and path) and the two checks routes depend on."""

    def __init__(self, store: SessionStore, *, cookie: str, path: str = "/", secure: bool = False) -> None:
        self.store, self.cookie, self.path, self.secure = store, cookie, path, secure

    def current(self, request: Any) -> Session | None:
        return self.store.get(request.cookies.get(self.cookie))

    def set_cookie(self, response: Any, session: Session) -> None:
        response.set_cookie(self.cookie, session.id, httponly=True, samesite="strict", path=self.path,
                            secure=self.secure)

    def clear_cookie(self, response: Any) -> None:
        response.delete_cookie(self.cookie, path=self.path)

    def require_user(self, request: Any) -> Session:
        """Dependency: the logged-in session, or LoginRequired."""
        s = self.current(request)
        if s is None or not s.authenticated:
            raise LoginRequired()
        return s

    async def require_post(self, request: Any) -> Posted:
        """Dependency for every state-changing POST: logged in, and the form carries the session's CSRF token."""
        s = self.require_user(request)
        form = await read_form(request)
        if not SessionStore.csrf_ok(s, form.get("csrf")):
            raise CsrfRejected()
        return Posted(s, form)

    async def login_attempt(self, request: Any, default_name: str) -> tuple[Session | None, dict[str, str], str | None, int]:
        """Check a posted login form: (new session, form, error, status). Raises CsrfRejected for a form that does
        not carry the CSRF token of the login page's (anonymous) session."""
        s = self.current(request)
        form = await read_form(request)
        if not SessionStore.csrf_ok(s, form.get("csrf")):
            raise CsrfRejected()
        assert s is not None
        client = request.client.host if request.client is not None else "?"
        if not self.store.login_allowed(client):
            return None, form, "too many wrong tokens in the last minute; wait a minute", 429
        if not self.store.check_token(form.get("token", "").strip()):
            self.store.login_failed(client)
            return None, form, "wrong access token", 401
        name = form.get("name", "").strip() or default_name
        if not valid_name(name):
            return None, form, "name: letters, digits and . _ @ - only (at most 64)", 400
        return self.store.login(s, name), form, None, 303
