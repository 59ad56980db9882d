"""Who is looking: the gRPC API's tokens and roles, kept in a server-side
session whose id travels in an HttpOnly, SameSite=Strict cookie; and the
cross-site request checks every POST passes (its Origin, and the session's
CSRF token)."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from realm_service.api.auth import AuthInterceptor

COOKIE = "realm_console"
SESSION_SECONDS = 12 * 3600.0
MAX_SESSIONS = 10_000  # bounded: logins from anyone cannot grow memory without end
MAX_TOKEN = 1024


@dataclass
class Session:
    role: str
    csrf: str
    expires: float

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Sessions:
    """Sessions of this process. Without tokens every caller acts as admin,
    as on the gRPC API, which then listens on loopback only (or --insecure)."""

    tokens: dict[str, str]
    secure_cookie: bool = False
    _by_id: dict[str, Session] = field(default_factory=dict)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)

    def role_of_token(self, token: str) -> str | None:
        """The same check as the gRPC interceptor's, constant-time."""
        if not token or len(token) > MAX_TOKEN:
            return None
        return AuthInterceptor(self.tokens).role_of([("authorization", f"Bearer {token}")])

    def current(self, request: web.Request) -> Session | None:
        session = self._by_id.get(request.cookies.get(COOKIE, ""))
        if session is not None and session.expires < time.monotonic():
            self._by_id.pop(request.cookies.get(COOKIE, ""), None)
            session = None
        if session is not None:
            return session
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer":
            role = self.role_of_token(token.strip())
            # A bearer header is not sent by a browser on its own: no CSRF
            # token is needed beside it, so the session is not stored.
            return Session(role, "", time.monotonic() + 60) if role else None
        return None

    def open(self, response: web.StreamResponse, role: str) -> Session:
        if len(self._by_id) >= MAX_SESSIONS:
            self._sweep()
        if len(self._by_id) >= MAX_SESSIONS:  # still full: the oldest go
            for key in list(self._by_id)[: MAX_SESSIONS // 10]:
                del self._by_id[key]
        session_id = secrets.token_urlsafe(32)
        session = Session(role, secrets.token_urlsafe(32), time.monotonic() + SESSION_SECONDS)
        self._by_id[session_id] = session
        response.set_cookie(
            COOKIE,
            session_id,
            httponly=True,
            samesite="Strict",
            secure=self.secure_cookie,
            path="/",
            max_age=int(SESSION_SECONDS),
        )
        return session

    def close(self, request: web.Request, response: web.StreamResponse) -> None:
        self._by_id.pop(request.cookies.get(COOKIE, ""), None)
        response.del_cookie(COOKIE, path="/")

    def _sweep(self) -> None:
        now = time.monotonic()
        for key, session in list(self._by_id.items()):
            if session.expires < now:
                del self._by_id[key]


def same_origin(request: web.Request) -> bool:
    """A POST's Origin (or, without one, its Referer) names this very
    server; browsers send Origin on every cross-site POST."""
    origin = request.headers.get("Origin") or request.headers.get("Referer", "")
    if not origin:
        return True  # not a browser's cross-site request (curl, a script)
    if origin == "null":
        return False
    host = request.headers.get("Host", "")
    scheme = "https" if request.secure else "http"
    expected = f"{scheme}://{host}"
    return origin == expected or origin.startswith(expected + "/")


def csrf_ok(session: Session, submitted: str) -> bool:
    if not session.csrf:  # a bearer-header caller: no cookie, nothing to forge
        return True
    return bool(submitted) and hmac.compare_digest(session.csrf.encode(), submitted.encode())
