"""The engine client's timeouts, against a fake engine on a real socket that accepts
and then falls silent, as a wedged vLLM does (an outside boundary: no patching)."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from ratchet.engine import EngineClient, EngineTimeout, EngineTimeouts, EngineUnavailable
from tests.helpers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CHUNK = b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'


@asynccontextmanager
async def fake_engine(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # takes the request, never answers
    await asyncio.sleep(30)


async def one_chunk_then_silence(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
    writer.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
    await writer.drain()
    await asyncio.sleep(30)


TIMEOUTS = EngineTimeouts(connect=1, chunk=0.5, total=1.0, admin=0.5, health=0.3)


def timed(work: Callable[[EngineClient], Awaitable[object]], handler: Handler) -> float:
    async def run() -> float:
        async with fake_engine(handler) as url:
            client = EngineClient(url, TIMEOUTS)
            started = time.monotonic()
            try:
                with pytest.raises(EngineTimeout):
                    await work(client)
            finally:
                await client.aclose()
            return time.monotonic() - started

    return asyncio.run(run())


def test_a_silent_engine_times_out_each_kind_of_call() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    assert timed(lambda c: c.models(), silent) < TIMEOUTS.admin + 2
    assert timed(lambda c: c.load_adapter("a", "/x"), silent) < TIMEOUTS.admin + 2
    assert timed(lambda c: c.chat(body, "r"), silent) < TIMEOUTS.total + 2
    assert timed(lambda c: c.chat(body, "r", timeout=0.3), silent) < 2.3  # a smoke test's

    async def health() -> bool:
        async with fake_engine(silent) as url:
            client = EngineClient(url, TIMEOUTS)
            try:
                return await client.health()
            finally:
                await client.aclose()

    assert asyncio.run(health()) is False


def test_a_stream_that_falls_silent_raises_after_the_chunk_timeout() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}

    async def read(client: EngineClient) -> list[str]:
        got = []
        async with client.stream_chat(body, "r") as lines:
            async for line in lines:
                got.append(line)
        return got

    took = timed(read, one_chunk_then_silence)
    assert TIMEOUTS.chunk <= took < TIMEOUTS.chunk + 2


def test_a_refused_connection_is_unavailable_not_a_timeout() -> None:
    async def run() -> None:
        client = EngineClient(f"http://127.0.0.1:{free_port()}", TIMEOUTS)
        try:
            with pytest.raises(EngineUnavailable) as caught:
                await client.models()
            assert not isinstance(caught.value, EngineTimeout)
        finally:
            await client.aclose()

    asyncio.run(run())
