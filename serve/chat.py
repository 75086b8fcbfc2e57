"""Chat completions through the engine, each answer logged before its id is returned.

Non-streamed answers are logged in one INSERT after the engine answers. Streamed
answers are inserted as 'streaming' before the first chunk (which carries the id)
is sent, and completed before `[DONE]` is sent, so a client that saw `[DONE]` can
vote on the answer at once. A client that leaves early leaves an 'aborted' row.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from feedback import completions
from feedback.completions import CompletionRecord
from ratchet.keys import ApiKey
from serve.engine import EngineClient
from serve.errors import InvalidRequest
from serve.ids import COMPLETION_ID
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest
from serve.replicas import EngineSet
from serve.routing import ModelRouter, Target

_NOT_PARAMS = {"model", "messages", "stream", "stream_options", "user"}


@dataclass
class _Stream:
    """What a streamed answer has said so far."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    failed: bool = False  # the engine sent an error chunk: the answer is not whole


class ChatService:
    def __init__(
        self,
        *,
        pool: AsyncConnectionPool,
        engines: EngineSet,
        router: ModelRouter,
        metrics: Metrics,
        max_tokens_cap: int,
        base_model_sha256: str | None,
    ) -> None:
        self.pool = pool
        self.engines = engines
        self.router = router
        self.metrics = metrics
        self.max_tokens_cap = max_tokens_cap
        self.base_model_sha256 = base_model_sha256
        self._background: set[asyncio.Future[None]] = set()

    def check(self, request: ChatCompletionRequest) -> None:
        """Refuse what the engine must never see; called before any work is done."""
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, name)
            if value is not None and value > self.max_tokens_cap:
                raise InvalidRequest(
                    f"{name}={value} is over this server's cap of {self.max_tokens_cap}.",
                    param=name,
                    code="max_tokens_over_cap",
                )

    async def generate(
        self, request: ChatCompletionRequest, target: Target, key: ApiKey
    ) -> tuple[dict[str, Any], CompletionRecord]:
        """Ask the engine for one answer; return the client response and its log row."""
        uid, started = uuid.uuid4(), time.perf_counter()
        body = self._engine_body(request, target)
        response, engine_url = await self.engines.call(
            target.adapter, lambda engine: engine.chat(body, uid.hex)
        )
        latency = time.perf_counter() - started
        response["id"], response["model"] = COMPLETION_ID.format(uid), request.model
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        record = self._record(request, target, key, uid, stream=False).model_copy(
            update={
                "output": choice["message"].get("content") or "",
                "finish_reason": choice.get("finish_reason"),
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "latency_ms": latency * 1000,
                "engine_url": engine_url,
            }
        )
        self.metrics.completion(
            request.model, False, latency, record.prompt_tokens, record.completion_tokens
        )
        return response, record

    async def complete(
        self, request: ChatCompletionRequest, target: Target, key: ApiKey
    ) -> dict[str, Any]:
        response, record = await self.generate(request, target, key)
        async with self.pool.connection() as conn:
            await completions.insert(conn, record)
        return response

    async def open_stream(
        self, request: ChatCompletionRequest, target: Target, key: ApiKey
    ) -> AsyncIterator[bytes]:
        """Start a streamed answer; engine errors raise here, before any byte is sent."""
        uid, started = uuid.uuid4(), time.perf_counter()
        body = self._engine_body(request, target)

        async def open_upstream(
            engine: EngineClient,
        ) -> tuple[AbstractAsyncContextManager[Any], Any]:
            context = engine.stream_chat(body, uid.hex)
            return context, await context.__aenter__()

        (upstream, response), engine_url = await self.engines.call(target.adapter, open_upstream)
        try:
            record = self._record(request, target, key, uid, stream=True)
            async with self.pool.connection() as conn:
                await completions.insert(conn, record.model_copy(update={"engine_url": engine_url}))
        except BaseException:
            await upstream.__aexit__(None, None, None)
            raise
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        model_fix = (
            f'"model":"{target.engine_model}"'.encode(),
            f'"model":"{request.model}"'.encode(),
        )

        async def relay() -> AsyncIterator[bytes]:
            state, done = _Stream(), False
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:]
                    if payload == "[DONE]":
                        status = "aborted" if state.failed else "complete"
                        await self._finish(uid, request, state, started, status)
                        done = True
                        yield b"data: [DONE]\n\n"
                        continue
                    chunk = json.loads(payload)
                    if _absorb(state, chunk) and not include_usage:
                        continue  # the usage-only chunk we asked for on our own account
                    yield b"data: " + payload.encode().replace(*model_fix) + b"\n\n"
            finally:
                await upstream.__aexit__(None, None, None)
                if not done:  # client gone or engine failed: keep what was said
                    self._spawn(self._finish(uid, request, state, started, "aborted"))

        return relay()

    async def _finish(
        self,
        uid: uuid.UUID,
        request: ChatCompletionRequest,
        state: _Stream,
        started: float,
        status: str,
    ) -> None:
        latency = time.perf_counter() - started
        async with self.pool.connection() as conn:
            await completions.finish(
                conn,
                uid,
                status=status,  # type: ignore[arg-type]
                output="".join(state.text),
                finish_reason=state.finish_reason,
                prompt_tokens=state.prompt_tokens,
                completion_tokens=state.completion_tokens,
                latency_ms=latency * 1000,
            )
        if status == "complete":
            self.metrics.completion(
                request.model, True, latency, state.prompt_tokens, state.completion_tokens
            )

    def _engine_body(self, request: ChatCompletionRequest, target: Target) -> dict[str, Any]:
        body = request.model_dump(exclude_unset=True, exclude_none=True)
        body["model"] = target.engine_model
        if request.max_tokens is None and request.max_completion_tokens is None:
            body["max_tokens"] = self.max_tokens_cap
        if request.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _record(
        self,
        request: ChatCompletionRequest,
        target: Target,
        key: ApiKey,
        uid: uuid.UUID,
        *,
        stream: bool,
    ) -> CompletionRecord:
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        params = {
            k: v
            for k, v in request.model_dump(exclude_unset=True, exclude_none=True).items()
            if k not in _NOT_PARAMS
        }
        params.setdefault("max_tokens", request.max_completion_tokens or self.max_tokens_cap)
        adapter = target.adapter
        return CompletionRecord(
            id=uid,
            key_id=key.id,
            end_user=request.user,
            public_model=request.model,
            engine_model=target.engine_model,
            adapter_id=adapter.id if adapter else None,
            adapter_sha256=adapter.sha256 if adapter else None,
            base_model_sha256=self.base_model_sha256,
            messages=messages,
            params=params,
            prompt_sha256=completions.prompt_sha256(messages),
            stream=stream,
            status="streaming" if stream else "complete",
        )

    async def drain(self) -> None:
        """Wait for pending log writes (aborted streams); call before closing the pool."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _absorb(state: _Stream, chunk: dict[str, Any]) -> bool:
    """Fold a chunk into the state; True when it is a usage-only chunk."""
    if chunk.get("error"):
        state.failed = True
    usage = chunk.get("usage")
    if usage:
        state.prompt_tokens = usage.get("prompt_tokens")
        state.completion_tokens = usage.get("completion_tokens")
    choices = chunk.get("choices") or []
    for choice in choices:
        delta = choice.get("delta") or {}
        if delta.get("content"):
            state.text.append(delta["content"])
        if choice.get("finish_reason"):
            state.finish_reason = choice["finish_reason"]
    return bool(usage) and not choices
