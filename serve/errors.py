"""The gateway's errors, and the one function that turns them into OpenAI error bodies.

APIError                      {"error": {"message", "type", "param", "code"}}
 ├── InvalidRequest      400  malformed JSON, schema violations, caps
 ├── Unauthorized        401  missing, unknown or revoked key
 ├── Forbidden           403  the key's role may not call this endpoint
 ├── NotFound            404  unknown model, completion or comparison
 ├── Conflict            409  a decision that contradicts an earlier one
 ├── PayloadTooLarge     413  the body is over the configured limit
 ├── EngineError         5xx/4xx passed through from vLLM, body kept
 └── EngineUnavailable   503  the engine is starting, restarting or unreachable
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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


class EngineUnavailable(APIError):
    """The engine cannot take requests now; retry after a few seconds."""

    status_code = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, code="engine_unavailable")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class EngineError(APIError):
    """vLLM refused or failed the request; its status and message are passed on."""

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        inner = body.get("error", body) if isinstance(body, dict) else {}
        message = str(inner.get("message") or body)
        super().__init__(message, param=inner.get("param"), code=inner.get("code"))
        self.status_code = status_code
        self.type = str(inner.get("type") or "engine_error")


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

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
