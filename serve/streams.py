"""Relaying one streamed answer from the engine to the client, and ending it cleanly.

A producer task reads the engine's lines (each read bounded by the chunk timeout,
the whole stream by the total one) into a queue; the relay sends them on. Whatever
ends the stream early — the engine dies or falls silent, the gateway shuts down —
the client gets an error event in OpenAI's streaming shape and the stream ends
without `[DONE]` (which would claim a whole answer); the row is `aborted` with what
was said so far. A client that leaves early leaves an `aborted` row too.

The first chunk sent carries the answer's `feedback_token` (see `serve.tokens`), as a
non-streamed answer does at its top level.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ratchet.engine import EngineError, EngineTimeout
from serve.errors import error_body

log = logging.getLogger(__name__)
_END = object()  # the engine closed the stream


@dataclass
class StreamState:
    """What a streamed answer has said so far."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    failed: bool = False  # the engine sent an error chunk: the answer is not whole
    started: float = field(default_factory=time.perf_counter)

    def absorb(self, chunk: dict[str, Any]) -> bool:
        """Fold a chunk into the state; True when it is a usage-only chunk."""
        if chunk.get("error"):
            self.failed = True
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")
        choices = chunk.get("choices") or []
        for choice in choices:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.text.append(delta["content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return bool(usage) and not choices


Finish = Callable[[StreamState, str], Awaitable[None]]


class Relay:
    """One stream in flight. `cut()` ends it at the next chunk (graceful shutdown)."""

    def __init__(
        self,
        lines: AsyncIterator[str],
        close_upstream: Callable[[], Awaitable[None]],
        *,
        total_timeout: float,
        public_model: str,
        engine_model: str,
        include_usage: bool,
        finish: Finish,
        spawn: Callable[[Awaitable[None]], None],
        feedback_token: str | None = None,
    ) -> None:
        self.lines = lines
        self.close_upstream = close_upstream
        self.total_timeout = total_timeout
        self.include_usage = include_usage
        self.finish = finish
        self.spawn = spawn
        self.feedback_token = feedback_token  # sent once, on the first chunk
        self.model_fix = (
            f'"model":"{engine_model}"'.encode(),
            f'"model":"{public_model}"'.encode(),
        )
        self.state = StreamState()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.cut_reason: str | None = None
        self.recorded = False  # the row's final state is written

    def cut(self, reason: str) -> None:
        self.cut_reason = reason
        self.queue.put_nowait(_END)  # wakes a relay waiting for the next chunk

    async def _produce(self) -> None:
        try:
            async with asyncio.timeout(self.total_timeout):
                async for line in self.lines:
                    self.queue.put_nowait(line)
            self.queue.put_nowait(_END)
        except TimeoutError:
            self.queue.put_nowait(EngineTimeout("the answer took longer than the total timeout"))
        except EngineError as exc:
            self.queue.put_nowait(exc)
        except Exception as exc:  # whatever it was, the relay must not wait forever
            log.exception("reading a stream from the engine failed")
            self.queue.put_nowait(EngineError(f"reading the stream failed: {exc!r}"))

    async def events(self) -> AsyncGenerator[bytes, None]:
        producer = asyncio.create_task(self._produce(), name="stream-producer")
        try:
            while True:
                item = await self.queue.get()
                if self.cut_reason is not None:
                    yield await self._fail(
                        "The server is shutting down; the answer was cut short.",
                        "server_shutting_down",
                    )
                    return
                if item is _END:  # closed without [DONE]: the engine went away
                    yield await self._fail("The model stopped answering.", "engine_unavailable")
                    return
                if isinstance(item, EngineTimeout):
                    yield await self._fail("The model did not answer in time.", "engine_timeout")
                    return
                if isinstance(item, EngineError):
                    yield await self._fail("The model stopped answering.", "engine_unavailable")
                    return
                assert isinstance(item, str)
                if not item.startswith("data: "):
                    continue
                payload = item[6:]
                if payload == "[DONE]":
                    status = "aborted" if self.state.failed else "complete"
                    if not await self._record(status):
                        yield _error_event(
                            "The answer could not be recorded; please retry.",
                            "storage_unavailable",
                        )
                        return
                    yield b"data: [DONE]\n\n"
                    return
                chunk = json.loads(payload)
                if self.state.absorb(chunk) and not self.include_usage:
                    continue  # the usage-only chunk we asked for on our own account
                if self.feedback_token is not None:
                    chunk["feedback_token"], self.feedback_token = self.feedback_token, None
                    payload = json.dumps(chunk, separators=(",", ":"))
                yield b"data: " + payload.encode().replace(*self.model_fix) + b"\n\n"
        finally:
            # No await before the work is handed over: a client that left cancels this
            # task, and under anyio every await in it would be cancelled again.
            producer.cancel()
            if not self.recorded:  # the client left: keep what was said
                self.spawn(self.finish(self.state, "aborted"))
            self.spawn(self._close(producer))

    async def _close(self, producer: asyncio.Task[None]) -> None:
        await asyncio.gather(producer, return_exceptions=True)
        await self.close_upstream()

    async def _record(self, status: str) -> bool:
        """Write the row's final state; False when even the spool could not take it (the
        row is then swept to `aborted` later)."""
        try:
            await self.finish(self.state, status)
        except Exception:
            log.exception("could not record the end of a stream")
            return False
        self.recorded = True
        return True

    async def _fail(self, message: str, code: str) -> bytes:
        """Record the row as aborted, then the error event the client gets."""
        await self._record("aborted")
        return _error_event(message, code)


def _error_event(message: str, code: str) -> bytes:
    body = error_body(message, "server_error", None, code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"
