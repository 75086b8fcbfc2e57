"""`ratchet serve` freezes what start-up built and collects garbage less often, once
its app has started (not before: what the app builds at start-up must be frozen too)."""

import json
import subprocess
import sys
import textwrap

from ratchet.serving import GC_THRESHOLDS

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, json, socket
    from contextlib import asynccontextmanager
    import uvicorn
    from fastapi import FastAPI
    from ratchet.serving import GracefulServer

    seen = {}

    @asynccontextmanager
    async def lifespan(app):
        seen["during_startup"] = gc.get_freeze_count()
        app.state.built = [object() for _ in range(1000)]  # start-up's own objects
        yield

    async def main():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(FastAPI(lifespan=lifespan), log_level="warning")
        server = GracefulServer(config, lambda: None)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        seen["frozen"] = gc.get_freeze_count()
        seen["thresholds"] = list(gc.get_threshold())
        server.should_exit = True
        await task

    asyncio.run(main())
    print(json.dumps(seen))
    """
)


def test_the_gateway_freezes_its_start_up_heap_once_started() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["during_startup"] == 0  # nothing frozen before the app's start-up ran
    assert seen["frozen"] > 1000  # modules, the app and what its start-up built
    assert seen["thresholds"] == list(GC_THRESHOLDS)
