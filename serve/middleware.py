"""Pure ASGI middleware (no per-request task or body copy, unlike BaseHTTPMiddleware)."""

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


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
