"""Talking to one vLLM server over its OpenAI API and its LoRA admin endpoints.

Every call has a connect timeout and a total timeout; a streamed answer also has a
timeout between chunks. A wedged engine (a hung GPU, a stopped process) accepts
connections and then says nothing, so without them a request would wait forever.

RatchetError
 └── EngineError            a call to a vLLM engine failed
      ├── EngineUnavailable   unreachable, reset, or 502/503/504: try another replica
      │    └── EngineTimeout  no answer (or no next chunk) within its timeout
      └── EngineRejected      the engine answered 4xx/500; its status and body are kept
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from ratchet.errors import RatchetError

log = logging.getLogger(__name__)
_LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=256)


class EngineError(RatchetError):
    """A call to a vLLM engine failed; `url` names the replica."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.url = url


class EngineUnavailable(EngineError):
    """The engine cannot be reached or says it is overloaded; another replica may answer."""


class EngineTimeout(EngineUnavailable):
    """The engine accepted the call but did not answer within its timeout."""


class EngineRejected(EngineError):
    """The engine answered with an error; its status and OpenAI error body are kept."""

    def __init__(self, status_code: int, body: dict[str, Any], url: str = "") -> None:
        inner = body.get("error", body) if isinstance(body, dict) else {}
        if not isinstance(inner, dict):
            inner = {"message": str(inner)}
        super().__init__(str(inner.get("message") or body), url)
        self.status_code = status_code
        self.body = body
        self.param = inner.get("param")
        self.code = inner.get("code")
        self.type = str(inner.get("type") or "engine_error")


@dataclass(frozen=True)
class EngineTimeouts:
    """Seconds. `total` bounds a whole generation; `chunk` the silence between two
    streamed chunks; `admin` the short calls (models, adapter loads, smoke tests)."""

    connect: float = 5.0
    chunk: float = 60.0
    total: float = 600.0
    admin: float = 30.0
    health: float = 2.0


class EngineClient:
    """One vLLM server."""

    def __init__(
        self,
        base_url: str,
        timeouts: EngineTimeouts | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or EngineTimeouts()
        t = self.timeouts
        self.http = http or httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(t.admin, connect=t.connect),
            limits=_LIMITS,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def health(self) -> bool:
        """True when /health answers 200 within the health timeout."""
        try:
            response = await self.http.get("/health", timeout=self.timeouts.health)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def models(self, limit: float | None = None) -> list[dict[str, Any]]:
        response = await self._request("GET", "/v1/models", limit)
        data: list[dict[str, Any]] = response.json()["data"]
        return data

    async def chat(
        self, body: dict[str, Any], request_id: str, timeout: float | None = None
    ) -> dict[str, Any]:
        """A non-streamed answer. vLLM sends nothing until it is done, so the read
        timeout is the total one (or `timeout`, e.g. the admin one for a smoke test)."""
        limit = timeout or self.timeouts.total
        response = await self._request(
            "POST",
            "/v1/chat/completions",
            limit=limit,
            json=body,
            headers={"X-Request-Id": request_id},
            timeout=httpx.Timeout(limit, connect=self.timeouts.connect),
        )
        result: dict[str, Any] = response.json()
        return result

    @asynccontextmanager
    async def stream_chat(
        self, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[AsyncIterator[str]]:
        """Open a streamed chat and yield its lines. Errors before the first byte raise
        here; later ones (a dead engine, `chunk` seconds of silence) raise from the
        iterator as EngineUnavailable / EngineTimeout. The caller bounds the total."""
        t = self.timeouts
        request = self.http.build_request(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"X-Request-Id": request_id},
            timeout=httpx.Timeout(t.chunk, connect=t.connect),
        )
        try:
            async with asyncio.timeout(t.chunk + t.connect):
                response = await self.http.send(request, stream=True)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise self._transport_error(exc) from exc
        try:
            if response.status_code != 200:
                await response.aread()
                raise self._status_error(response)
            yield self._lines(response)
        finally:
            await response.aclose()

    async def _lines(self, response: httpx.Response) -> AsyncIterator[str]:
        try:
            async for line in response.aiter_lines():
                yield line
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc

    async def load_adapter(self, name: str, path: str) -> None:
        await self._request(
            "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
        )

    async def unload_adapter(self, name: str) -> None:
        await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    async def _request(
        self, method: str, path: str, limit: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        try:
            # httpx's timeouts bound each read; this bounds the whole call.
            async with asyncio.timeout(limit or self.timeouts.admin):
                response = await self.http.request(method, path, **kwargs)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise self._transport_error(exc) from exc
        if response.status_code != 200:
            raise self._status_error(response)
        return response

    def _transport_error(self, exc: BaseException) -> EngineUnavailable:
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return EngineTimeout(f"engine {self.base_url} did not answer in time", self.base_url)
        return EngineUnavailable(f"engine {self.base_url} unreachable: {exc!r}", self.base_url)

    def _status_error(self, response: httpx.Response) -> EngineError:
        if response.status_code in (502, 503, 504):
            return EngineUnavailable(
                f"engine {self.base_url} answered {response.status_code}", self.base_url
            )
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text or response.reason_phrase}}
        if not isinstance(body, dict):
            body = {"error": {"message": str(body)}}
        return EngineRejected(response.status_code, body, self.base_url)
