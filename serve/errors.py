"""The gateway's errors, and the one function that turns them into OpenAI error bodies.

APIError                      {"error": {"message", "type", "param", "code"}}
 ├── InvalidRequest      400  malformed JSON, schema violations, caps
 ├── Unauthorized        401  missing, unknown or revoked key
 ├── Forbidden           403  the key's role may not call this endpoint
 ├── NotFound            404  unknown model, completion or comparison
 ├── Conflict            409  a decision that contradicts an earlier one
 ├── PayloadTooLarge     413  the body is over the configured limit
 ├── TooManyRequests     429  over a quota or cap (Retry-After, x-ratelimit-*)
 ├── EnginePassthrough   vLLM's 4xx/5xx status; a 4xx's message without URLs or paths
 └── Unavailable         503  engines, database or job queue cannot take it now (Retry-After)
      └── GatewayTimeout 504  the engine did not answer in time (Retry-After)

Errors from the core are mapped here too (`ratchet.engine.EngineError`, the answer
log's StorageUnavailable, a database that is down), and anything unexpected becomes a
500 in the same body: a client never gets a plain-text error.
"""

import json
import logging
import re
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg import InterfaceError, OperationalError
from psycopg_pool import PoolClosed, PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from feedback.errors import StorageUnavailable
from ratchet.engine import EngineError, EngineRejected, EngineTimeout

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see, in OpenAI's error shape."""

    status_code = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidRequest(APIError):
    """The request is malformed or asks for something the gateway refuses."""

    status_code = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    """No valid API key was presented."""

    status_code = 401
    type = "authentication_error"


class Forbidden(APIError):
    """The key is valid but its role may not use this endpoint."""

    status_code = 403
    type = "permission_error"


class NotFound(APIError):
    """The named model, completion or comparison does not exist."""

    status_code = 404
    type = "not_found_error"


class Conflict(APIError):
    """The request contradicts a decision already recorded."""

    status_code = 409
    type = "conflict_error"


class PayloadTooLarge(APIError):
    """The request body is larger than `max_body_bytes`."""

    status_code = 413
    type = "invalid_request_error"


class TooManyRequests(APIError):
    """Over a quota (a key's requests, tokens or concurrency, a voter's daily votes) or
    the gateway's in-flight cap; retry after `retry_after` seconds."""

    status_code = 429
    type = "rate_limit_error"

    def __init__(
        self,
        message: str,
        *,
        code: str = "rate_limit_exceeded",
        retry_after: int = 1,
        param: str | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = max(1, retry_after)
        self.extra_headers = extra_headers or {}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after), **self.extra_headers}


class Unavailable(APIError):
    """A dependency (the engines, the database, the job queue) cannot take the request
    now; retry after a few seconds."""

    status_code = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, code: str, retry_after: int = 5) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class GatewayTimeout(Unavailable):
    """The engine accepted the request but did not answer within its timeout."""

    status_code = 504
    type = "timeout_error"


class EnginePassthrough(APIError):
    """vLLM refused or failed the request. Its status is passed on, and for a 4xx (a
    prompt over the context, a value it refuses) its message, with every URL, address
    and path in it replaced: a client never learns where the replicas are or what
    their disks hold. A 5xx's message is vLLM's internals: it stays in the log."""

    def __init__(self, exc: EngineRejected) -> None:
        client_error = exc.status_code < 500
        super().__init__(
            scrub(exc.message, exc.url) if client_error else "The model failed to answer.",
            param=exc.param if isinstance(exc.param, str) else None,
            code=str(exc.code) if isinstance(exc.code, str | int) else None,
        )
        self.status_code = exc.status_code
        self.type = exc.type if client_error else "server_error"


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"`<>()]+")
_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")
_PATH = re.compile(r"(?<![\w./:~-])/[\w.@+~-]+(?:/[\w.@+~-]*)*")


def scrub(message: str, url: str = "") -> str:
    """`message` without the replica's URL or host, nor any other URL, IP address or
    absolute path (e.g. a model's directory)."""
    if url:
        message = message.replace(url.rstrip("/"), "<engine>")
        host = urlsplit(url).netloc
        if host:
            message = message.replace(host, "<engine>")
    message = _URL.sub("<url>", message)
    message = _ADDRESS.sub("<address>", message)
    return _PATH.sub("<path>", message)


def from_engine(exc: EngineError) -> APIError:
    """The client's view of an engine failure. Replica URLs stay in the logs."""
    if isinstance(exc, EngineTimeout):
        return GatewayTimeout(
            "The model did not answer in time; please retry.", code="engine_timeout"
        )
    if isinstance(exc, EngineRejected):
        return EnginePassthrough(exc)
    return Unavailable(
        "No model replica can take the request right now; please retry.",
        code="engine_unavailable",
    )


def unsupported_parameter(param: str) -> InvalidRequest:
    """A field the gateway does not take (OpenAI's own wording and code)."""
    return InvalidRequest(
        f"Unrecognized request argument supplied: {param}",
        param=param,
        code="unsupported_parameter",
    )


def database_unavailable() -> Unavailable:
    return Unavailable(
        "The database is unavailable and this request needs it; please retry.",
        code="database_unavailable",
    )


def error_body(
    message: str, type_: str, param: str | None, code: str | int | None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_event(exc: APIError) -> bytes:
    """The error as a server-sent event, for a stream whose 200 is already sent."""
    body = error_body(exc.message, exc.type, exc.param, exc.code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers(),
    )


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    # A union's errors carry the member tried in their path (`content.str`,
    # `content.list[TextPart].0`): the client named `content`, not the member.
    parts = [str(p) for p in loc[1 if loc[:1] == ("body",) else 0 :] if not _union_member(p)]
    return ".".join(parts) or None


def _union_member(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this type as JSON (no type: it does)."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _http_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return str(status)


def install(app: FastAPI) -> None:
    """Map every error the app can raise onto the OpenAI error body."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        # A refused field first: it is what the client must change, whatever else is wrong.
        first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return error_response(
                InvalidRequest("request body is not valid JSON", code="invalid_json")
            )
        if loc == ("body",) and not is_json(request.headers.get("content-type")):
            error = InvalidRequest(
                "Send the request body as JSON (Content-Type: application/json).",
                code="unsupported_media_type",
            )
            error.status_code = 415
            return error_response(error)
        param = _validation_param(loc)
        if first.get("type") == "extra_forbidden" and param:
            return error_response(unsupported_parameter(param))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(InvalidRequest(message, param=param, code="invalid_value"))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status, message = exc.status_code, str(exc.detail)
        where = f"{request.method} {request.url.path}"
        if status == 404 and message == "Not Found":  # no route: say which, as OpenAI does
            message = f"Invalid URL ({where})."
        elif status == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"Method not allowed ({where}); allowed: {allowed}."
        error = APIError(message, code=_http_code(status))
        error.status_code = status
        error.type = "invalid_request_error" if status < 500 else "server_error"
        response = error_response(error)
        response.headers.update(exc.headers or {})  # e.g. 405's Allow
        return response

    async def on_engine(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EngineError)
        log.warning("engine call failed: %s", exc)
        return error_response(from_engine(exc))

    async def on_storage(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        if isinstance(exc, StorageUnavailable):
            return error_response(
                Unavailable(exc.message, code=exc.code, retry_after=exc.retry_after)
            )
        return error_response(database_unavailable())

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the OpenAI body.
        return error_response(APIError("The server failed to handle this request."))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(EngineError, on_engine)
    for kind in (StorageUnavailable, OperationalError, InterfaceError, PoolTimeout, PoolClosed):
        app.add_exception_handler(kind, on_storage)
    app.add_exception_handler(Exception, on_unexpected)
