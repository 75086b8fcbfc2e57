"""The gateway's errors, and the one function that turns them into OpenAI error bodies.

APIError                      {"error": {"message", "type", "param", "code"}}
 ├── InvalidRequest      400  malformed JSON, schema violations, caps
 ├── Unauthorized        401  missing, unknown or revoked key
 ├── Forbidden           403  the key's role may not call this endpoint
 ├── NotFound            404  unknown model, completion or comparison
 ├── Conflict            409  a decision that contradicts an earlier one
 ├── PayloadTooLarge     413  the body is over the configured limit
 ├── EnginePassthrough   4xx/5xx passed through from vLLM, body kept
 └── Unavailable         503  engines, database or job queue cannot take it now (Retry-After)
      └── GatewayTimeout 504  the engine did not answer in time (Retry-After)

Errors from the core are mapped here too (`ratchet.engine.EngineError`, the answer
log's StorageUnavailable, a database that is down), and anything unexpected becomes a
500 in the same body: a client never gets a plain-text error.
"""

import logging
from typing import Any

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
    """vLLM refused or failed the request; its status and message are passed on."""

    def __init__(self, exc: EngineRejected) -> None:
        super().__init__(exc.message, param=exc.param, code=exc.code)
        self.status_code = exc.status_code
        self.type = exc.type


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


def database_unavailable() -> Unavailable:
    return Unavailable(
        "The database is unavailable and this request needs it; please retry.",
        code="database_unavailable",
    )


def error_body(
    message: str, type_: str, param: str | None, code: str | int | None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers(),
    )


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    """Map every error the app can raise onto the OpenAI error body."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(
                InvalidRequest("request body is not valid JSON", code="invalid_json")
            )
        param = _validation_param(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(InvalidRequest(message, param=param, code="invalid_value"))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = APIError(str(exc.detail), code=str(exc.status_code))
        error.status_code = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(error)

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
