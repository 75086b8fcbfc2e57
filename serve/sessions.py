"""The report pages' browser sessions on the web side: the cookie, CSRF and Origin checks.

The cookie holds only a random session id (see ratchet/sessions.py), HttpOnly and
SameSite=Strict, scoped to /reports, `Secure` when `session_cookie_secure` is set.
A POST that relies on the cookie must come from one of our own pages: its Origin (or
Referer, when a browser sends no Origin) is the request's own scheme and host or one of
`allowed_origins`, and its form carries the session's CSRF token. The sign-in form has
no session yet, so it relies on the Origin check alone (plus SameSite): every browser
that runs a cross-site form sends an Origin, and a missing one is refused, so a
pre-session token would add a second cookie and stop nothing more.
"""

import hmac
import uuid
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response

from ratchet import sessions
from ratchet.sessions import Session
from ratchet.settings import Settings
from serve.deps import Services

COOKIE = "ratchet_session"
# Where gateways before report sessions kept the raw key; cleared at sign-in and out.
OLD_COOKIE = "ratchet_key"
PATH = "/reports"


async def current(services: Services, session_id: str | None) -> Session | None:
    """The live session the cookie names, or None."""
    if not session_id:
        return None
    async with services.pool.connection() as conn:
        return await sessions.find(conn, session_id, services.settings.session_idle_s)


async def start(services: Services, key_id: uuid.UUID) -> tuple[str, str]:
    """A new session for the key: (session id for the cookie, CSRF token)."""
    async with services.pool.connection() as conn:
        return await sessions.start(conn, key_id, services.settings.session_ttl_s)


async def end(services: Services, session_id: str) -> None:
    async with services.pool.connection() as conn:
        await sessions.end(conn, session_id)


def set_cookie(response: Response, session_id: str, settings: Settings) -> None:
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(settings.session_ttl_s),
        path=PATH,
        secure=settings.session_cookie_secure,
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(OLD_COOKIE, path=PATH)


def clear_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        COOKIE, path=PATH, secure=settings.session_cookie_secure, httponly=True, samesite="strict"
    )
    response.delete_cookie(OLD_COOKIE, path=PATH)


def csrf_ok(session: Session, submitted: str | None) -> bool:
    # Constant time: the comparison must not tell an attacker how much of a guess matched.
    return bool(submitted) and hmac.compare_digest(
        session.csrf_token.encode(), (submitted or "").encode()
    )


def sender(request: Request) -> str | None:
    """The origin a browser says the request comes from: Origin, else Referer's."""
    origin = request.headers.get("origin")
    if origin is None and (referer := request.headers.get("referer")):
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"
    return _normal(origin) if origin is not None else None


def origin_ok(request: Request, settings: Settings, required: bool) -> bool:
    """Whether a POST may act: it comes from our own origin or an allowed one. A request
    that names no origin passes only when not `required` (a Bearer client, not a
    browser's form)."""
    origin = sender(request)
    if origin is None:
        return not required
    own = _normal(f"{request.url.scheme}://{request.headers.get('host', '')}")
    return origin == own or origin in {_normal(o) for o in settings.allowed_origins}


def _normal(origin: str) -> str:
    return origin.strip().rstrip("/").lower()
