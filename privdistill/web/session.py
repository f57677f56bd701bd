"""Access-token login for the web pages: the token file, server-side sessions with a per-session CSRF token, a
login throttle, and the checks routes depend on (site_agent.ui and coordinator.web share it)."""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response

from privdistill.errors import ConfigError
from privdistill.identity import loose_mode

MIN_TOKEN_CHARS = 16
SESSION_TTL_S = 8 * 3600
MAX_SESSIONS = 1000
LOGIN_FAILURES_PER_MINUTE = 10
MAX_BACKOFF_S = 4.0
ANON_PREFIX = "a."
ANON_TTL_S = 3600  # a login form is good for an hour
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


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
    """Sessions keyed by a random id held in an HttpOnly cookie. Logged-in sessions live in memory (a restart logs
    everyone out; only token holders make them, at most ``max_sessions``). A not-yet-logged-in session is *not*
    stored: its id carries its issue time and its CSRF token is an HMAC of the id under a per-process key, so any
    number of anonymous visitors cannot evict the login form a steward has open."""

    def __init__(self, token: str, *, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self._token = token
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self._sessions: dict[str, Session] = {}
        self._key = secrets.token_bytes(32)  # signs anonymous sessions' CSRF tokens
        self._failures: dict[str, deque[float]] = {}  # wrong tokens per client address and per session
        self._lock = threading.Lock()

    def check_token(self, candidate: str | None) -> bool:
        return same(candidate, self._token)

    def _new(self, user: str) -> Session:
        s = Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), user=user)
        with self._lock:
            self._expire()
            while len(self._sessions) >= self.max_sessions:  # only token holders get here: oldest goes first
                del self._sessions[min(self._sessions.values(), key=lambda x: x.created).id]
            self._sessions[s.id] = s
        return s

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        for sid in [k for k, v in self._sessions.items() if v.created < cutoff]:
            del self._sessions[sid]

    def _anon_csrf(self, sid: str) -> str:
        return hmac.new(self._key, sid.encode(), "sha256").hexdigest()

    def anonymous(self) -> Session:
        """A not-yet-logged-in session (stored nowhere): it carries the CSRF token the login form posts back."""
        sid = f"{ANON_PREFIX}{int(time.time())}.{secrets.token_urlsafe(16)}"
        return Session(id=sid, csrf=self._anon_csrf(sid), user=None)

    def _anonymous(self, sid: str) -> Session | None:
        parts = sid[len(ANON_PREFIX):].split(".")
        if len(parts) != 2 or not parts[0].isdigit() or not 0 <= time.time() - int(parts[0]) <= ANON_TTL_S:
            return None
        return Session(id=sid, csrf=self._anon_csrf(sid), user=None)

    def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        if sid.startswith(ANON_PREFIX):
            return self._anonymous(sid)
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

    def backoff_s(self, *keys: str) -> float:
        """How long an attempt from these sources (client address, session) waits before its token is checked:
        0 until LOGIN_FAILURES_PER_MINUTE wrong tokens in the last minute, then doubling up to MAX_BACKOFF_S."""
        with self._lock:
            cutoff = time.monotonic() - 60
            for k in list(self._failures):
                q = self._failures[k]
                while q and q[0] < cutoff:
                    q.popleft()
                if not q:
                    del self._failures[k]
            worst = max((len(self._failures.get(k, ())) for k in keys), default=0)
        over = worst - LOGIN_FAILURES_PER_MINUTE
        return 0.0 if over < 0 else min(MAX_BACKOFF_S, 0.25 * 2 ** over)

    def login_failed(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                if k not in self._failures and len(self._failures) >= 4 * self.max_sessions:
                    self._failures.pop(next(iter(self._failures)))  # bounded memory: forget the oldest source
                self._failures.setdefault(k, deque(maxlen=4 * LOGIN_FAILURES_PER_MINUTE)).append(time.monotonic())


def host_of(header: str | None) -> str:
    """The host name of a Host header, lower-case, without the port (IPv6 literals without their brackets)."""
    value = (header or "").strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


# ----------------------------------------------------------------------------- request glue
MAX_FORM_BYTES = 16 * 1024
NAME_PATTERN = r"[A-Za-z0-9._@-]{1,64}"


class LoginRequired(Exception):
    """No logged-in session: a GET goes to the login page, anything else is answered 401."""


class CsrfRejected(Exception):
    """A POST without this session's CSRF token: 403."""


class FormTooLarge(Exception):
    """A form body over MAX_FORM_BYTES: 413."""


@dataclass
class LoginAttempt:
    """A checked login form: ``session`` is the new logged-in session, or None with ``error`` and the HTTP
    ``status`` to answer; ``csrf`` is the login page's token, for showing the form again."""

    session: Session | None
    form: dict[str, str]
    csrf: str
    error: str | None = None
    status: int = 303


@dataclass
class Posted:
    """A state-changing POST that passed the checks: its session and its form fields."""

    session: Session
    form: dict[str, str]


def valid_name(name: str) -> bool:
    """A user name fit for the audit log (``ui:NAME``)."""
    return re.fullmatch(NAME_PATTERN, name) is not None


async def read_form(request: Request) -> dict[str, str]:
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
    """One app's login: its session store, its cookie (name; path: the pages' ``prefix``, "" for the site root)
    and the two checks routes depend on."""

    def __init__(self, store: SessionStore, *, cookie: str, prefix: str = "", secure: bool = False) -> None:
        self.store, self.cookie, self.prefix, self.secure = store, cookie, prefix, secure

    @property
    def path(self) -> str:
        return self.prefix or "/"

    def current(self, request: Request) -> Session | None:
        return self.store.get(request.cookies.get(self.cookie))

    def set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(self.cookie, session.id, httponly=True, samesite="strict", path=self.path,
                            secure=self.secure)

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(self.cookie, path=self.path)

    def require_user(self, request: Request) -> Session:
        """Dependency: the logged-in session, or LoginRequired."""
        s = self.current(request)
        if s is None or not s.authenticated:
            raise LoginRequired()
        return s

    async def require_post(self, request: Request) -> Posted:
        """Dependency for every state-changing POST: logged in, and the form carries the session's CSRF token. The
        (bounded) form is read first: a refusal with the body unread would cost the client its keep-alive
        connection."""
        form = await read_form(request)
        s = self.require_user(request)
        if not SessionStore.csrf_ok(s, form.get("csrf")):
            raise CsrfRejected()
        return Posted(s, form)

    async def login_attempt(self, request: Request, default_name: str) -> LoginAttempt:
        """Check a posted login form. Raises CsrfRejected for a form that does not carry the CSRF token of the login
        page's (anonymous) session."""
        s = self.current(request)
        form = await read_form(request)
        if s is None or not SessionStore.csrf_ok(s, form.get("csrf")):
            raise CsrfRejected()
        # the socket's peer (uvicorn runs with proxy_headers off: X-Forwarded-For is never believed)
        sources = (f"client:{request.client.host if request.client is not None else '?'}", f"session:{s.id}")
        delay = self.store.backoff_s(*sources)
        if delay:  # back off before checking: bounds the guessing rate per source without refusing the token
            await asyncio.sleep(delay)
        if not self.store.check_token(form.get("token", "").strip()):
            self.store.login_failed(*sources)
            if delay:
                return LoginAttempt(None, form, s.csrf, "too many wrong tokens in the last minute: wait a minute (the "
                                                        "right token is still accepted)", 429)
            return LoginAttempt(None, form, s.csrf, "wrong access token", 401)
        name = form.get("name", "").strip() or default_name
        if not valid_name(name):
            return LoginAttempt(None, form, s.csrf, "name: letters, digits and . _ @ - only (at most 64)", 400)
        return LoginAttempt(self.store.login(s, name), form, s.csrf)
