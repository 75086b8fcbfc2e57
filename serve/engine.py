"""Talking to one vLLM server over its OpenAI API and its LoRA admin endpoints."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from serve.errors import EngineError, EngineUnavailable

log = logging.getLogger(__name__)

# Reads have no timeout: a long generation is not a failure. Connecting is quick or down.
_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)
_LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=256)


class EngineClient:
    """One vLLM server. Connection failures become EngineUnavailable (503, Retry-After)."""

    def __init__(self, base_url: str, http: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http or httpx.AsyncClient(
            base_url=self.base_url, timeout=_TIMEOUT, limits=_LIMITS
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def health(self) -> bool:
        try:
            response = await self.http.get("/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def models(self) -> list[dict[str, Any]]:
        response = await self._request("GET", "/v1/models")
        data: list[dict[str, Any]] = response.json()["data"]
        return data

    async def chat(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        response = await self._request(
            "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": request_id}
        )
        result: dict[str, Any] = response.json()
        return result

    @asynccontextmanager
    async def stream_chat(
        self, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[httpx.Response]:
        """Open a streamed chat; errors before the first byte raise, like `chat`."""
        request = self.http.build_request(
            "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": request_id}
        )
        try:
            response = await self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
        try:
            if response.status_code != 200:
                await response.aread()
                raise _engine_error(response)
            yield response
        finally:
            await response.aclose()

    async def load_adapter(self, name: str, path: str) -> None:
        await self._request(
            "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
        )

    async def unload_adapter(self, name: str) -> None:
        await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise _engine_error(response)
        return response


def _engine_error(response: httpx.Response) -> EngineError | EngineUnavailable:
    if response.status_code in (502, 503, 504):
        return EngineUnavailable(f"engine answered {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text or response.reason_phrase}}
    if not isinstance(body, dict):
        body = {"error": {"message": str(body)}}
    return EngineError(response.status_code, body)
