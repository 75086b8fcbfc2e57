"""Pure ASGI middleware (no per-request task or body copy, unlike BaseHTTPMiddleware)."""

import re
import secrets

from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import PayloadTooLarge, error_response
from serve.metrics import Metrics


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(self._error())(scope, receive, send)
            return
        if declared is None:
            # No declared length (chunked): read it all first, within the limit, then replay.
            # Raising mid-read would be reported by FastAPI as a generic parse error.
            body, more = [], True
            size = 0
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                body.append(message)
                size += len(message.get("body", b""))
                more = message.get("more_body", False)
                if size > self.limit:
                    await error_response(self._error())(scope, receive, send)
                    return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"Request body is over the limit of {self.limit} bytes.", code="body_too_large"
        )


class RequestMetrics:
    """Count requests by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, str(status)).inc()


class SecurityHeaders:
    """Headers that keep browsers from misusing any response, the report pages above all.

    Each request gets a fresh CSP nonce in `scope["state"]["csp_nonce"]`; a page puts it
    on its own <style> blocks, and nothing else inline is allowed: no scripts at all, no
    style attributes, no framing, forms posting only to this origin. Headers a route
    already set are left as they are. Report pages (and their JSON and Markdown, which
    hold the same data) are never stored by caches. FastAPI's API docs pages load Swagger
    UI and ReDoc from a CDN with an inline script; they hold no data and get no CSP.
    """

    DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        path: str = scope["path"]
        private = path.startswith("/reports")
        docs = path in self.DOCS

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _security_headers(nonce, private):
                    if name not in headers and not (docs and name == "content-security-policy"):
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


def _security_headers(nonce: str, private: bool) -> list[tuple[str, str]]:
    csp = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    headers = [
        ("content-security-policy", csp),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        # Not no-referrer: with it, browsers send `Origin: null` on a form's POST, and the
        # report forms' Origin check could not tell our own pages from anyone's.
        ("referrer-policy", "same-origin"),
    ]
    if private:
        headers.append(("cache-control", "no-store"))
    return headers


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


class FeedbackCORS:
    """CORS for the two routes a browser may call with a `feedback_token` alone (votes
    and choices), so a chat product on another origin can send thumbs straight from
    the end user's browser. No cookies are involved (credentials stay off), and every
    other route answers no cross-origin request."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["POST"],
            allow_headers=["content-type"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _FEEDBACK_PATH.fullmatch(scope["path"]):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


_FEEDBACK_PATH = re.compile(r"/v1/feedback|/v1/comparisons/[^/]+/choice")
