"""Chat completions through the engine, each answer logged before its id is returned.

Non-streamed answers are logged in one write after the engine answers. Streamed
answers are logged as 'streaming' before the first chunk (which carries the id) is
sent, and completed before `[DONE]` is sent, so a client that saw `[DONE]` can vote
on the answer at once. Writes go through the answer log: to Postgres, or to the
durable spool while it is down. See `serve.streams` for how a stream ends early.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Collection
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from feedback import completions
from feedback.completions import CompletionRecord
from feedback.log import AnswerLog
from ratchet.engine import EngineClient
from ratchet.keys import ApiKey
from ratchet.replicas import EngineSet
from serve.errors import APIError, InvalidRequest, Unavailable, error_event
from serve.ids import COMPLETION_ID
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest
from serve.routing import ModelRouter, Target
from serve.streams import Relay, StreamState
from serve.tokens import FeedbackTokens

log = logging.getLogger(__name__)
T = TypeVar("T")
_NOT_PARAMS = {"model", "messages", "stream", "stream_options", "user"}


class ChatService:
    def __init__(
        self,
        *,
        answers: AnswerLog,
        engines: EngineSet,
        router: ModelRouter,
        metrics: Metrics,
        max_tokens_cap: int,
        base_model_sha256: str | None,
        gateway_id: uuid.UUID | None = None,
        total_timeout: float = 600.0,
        tokens: FeedbackTokens | None = None,
        extra_request_fields: Collection[str] = (),
    ) -> None:
        self.answers = answers
        self.engines = engines
        self.router = router
        self.metrics = metrics
        self.max_tokens_cap = max_tokens_cap
        self.base_model_sha256 = base_model_sha256
        self.gateway_id = gateway_id
        self.total_timeout = total_timeout
        self.tokens = tokens  # None: answers carry no feedback_token
        # Fields ops let through to the engine beyond the declared ones (settings).
        self.extra_request_fields = frozenset(extra_request_fields)
        self.streams: dict[uuid.UUID, Relay] = {}
        self.cutting = asyncio.Event()  # set when the shutdown grace period is over
        self._background: set[asyncio.Future[None]] = set()

    def check(self, request: ChatCompletionRequest) -> None:
        """Refuse what the engine must never see; called before any work is done."""
        request.check_fields(self.extra_request_fields)
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
        response, engine_url = await self._until_cut(
            self.engines.call(target.adapter, lambda engine: engine.chat(body, uid.hex))
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
        await self.answers.completion(record)
        if self.tokens is not None:  # only once the answer is logged and can be voted on
            response["feedback_token"] = self.tokens.issue("completion", record.id, key.id)
        return response

    async def open_stream(
        self, request: ChatCompletionRequest, target: Target, key: ApiKey
    ) -> AsyncIterator[bytes]:
        """Start a streamed answer; engine errors raise here, before any byte is sent."""
        uid, started = uuid.uuid4(), time.perf_counter()
        body = self._engine_body(request, target)

        async def open_upstream(
            engine: EngineClient,
        ) -> tuple[AbstractAsyncContextManager[AsyncIterator[str]], AsyncIterator[str]]:
            context = engine.stream_chat(body, uid.hex)
            return context, await context.__aenter__()

        (upstream, lines), engine_url = await self._until_cut(
            self.engines.call(target.adapter, open_upstream)
        )

        async def close_upstream() -> None:
            await upstream.__aexit__(None, None, None)

        try:
            record = self._record(request, target, key, uid, stream=True)
            await self.answers.completion(record.model_copy(update={"engine_url": engine_url}))
        except BaseException:
            await close_upstream()
            raise
        relay = Relay(
            lines,
            close_upstream,
            total_timeout=self.total_timeout,
            public_model=request.model,
            engine_model=target.engine_model,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            finish=lambda state, status: self._finish(uid, request, state, status),
            spawn=self._spawn,
            feedback_token=self.tokens.issue("completion", uid, key.id) if self.tokens else None,
        )
        relay.state.started = started  # the latency logged counts the engine's start too
        if self.cutting.is_set():
            relay.cut("server_shutting_down")
        self.streams[uid] = relay
        return self._tracked(uid, relay)

    async def _tracked(self, uid: uuid.UUID, relay: Relay) -> AsyncIterator[bytes]:
        events = relay.events()
        try:
            async for event in events:
                yield event
        except Exception:
            # The 200 and its headers are sent: an error can only be the last event.
            log.exception("a streamed answer failed")
            yield error_event(APIError("The answer failed mid-stream.", code="stream_failed"))
        finally:
            self.streams.pop(uid, None)
            # Leaving a loop does not close the generator it read: close it now, so
            # that a client that left gets its row written at once, not at GC.
            await events.aclose()

    def cut_all(self) -> None:
        """End the shutdown grace period: streams end with an error event, and answers
        still being generated get 503, so that the gateway can stop."""
        self.cutting.set()
        for relay in list(self.streams.values()):
            relay.cut("server_shutting_down")

    async def _until_cut(self, work: Awaitable[T]) -> T:
        if self.cutting.is_set():
            raise _shutting_down()
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(self.cutting.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():  # cut, or the client left and this request is cancelled
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise _shutting_down()
        return task.result()

    async def _finish(
        self, uid: uuid.UUID, request: ChatCompletionRequest, state: StreamState, status: str
    ) -> None:
        latency = time.perf_counter() - state.started
        await self.answers.finish(
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

    def _allowed_fields(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """The fields that may reach the engine and the log: the declared ones and those
        ops allowed. `check` refused any other; dropping them here too keeps the
        allow-list whole should a caller ever skip it."""
        allowed = ChatCompletionRequest.model_fields.keys() | self.extra_request_fields
        fields = request.model_dump(exclude_unset=True, exclude_none=True)
        return {k: v for k, v in fields.items() if k in allowed}

    def _engine_body(self, request: ChatCompletionRequest, target: Target) -> dict[str, Any]:
        body = self._allowed_fields(request)
        body["model"] = target.engine_model
        if request.max_tokens is None and request.max_completion_tokens is None:
            body["max_tokens"] = self.max_tokens_cap
        # Ours, not the client's: usage for the log when streamed; none otherwise (vLLM
        # refuses stream_options without stream, and include_obfuscation is OpenAI's).
        body.pop("stream_options", None)
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
        params = {k: v for k, v in self._allowed_fields(request).items() if k not in _NOT_PARAMS}
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
            gateway_id=self.gateway_id,
        )

    async def drain(self) -> None:
        """Wait for pending log writes (aborted streams); call before closing the pool."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _shutting_down() -> Unavailable:
    return Unavailable(
        "The server is shutting down; please retry.", code="server_shutting_down", retry_after=1
    )
