"""`ratchet serve`: database, migrations, engine supervisor and gateway in one process."""

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import psycopg
import uvicorn

from ratchet import keys
from ratchet.db import database_url
from ratchet.model import ensure_base_model
from ratchet.settings import Settings

log = logging.getLogger(__name__)


def run_gateway(settings: Settings) -> None:
    from ratchet.migrate import migrate
    from serve.app import begin_shutdown, create_app
    from serve.supervisor import EngineSupervisor

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per engine call otherwise
    with database_url(settings) as url:
        migrate(url)
        supervisor = None
        if not settings.external_engines:
            ensure_base_model(settings)
            supervisor = EngineSupervisor(settings, settings.data_dir / "logs" / "engine.log")
        app = create_app(settings, url, supervisor=supervisor)
        engine = (
            ", ".join(settings.engine_base_urls)
            if supervisor is None
            else f"{supervisor.url} (starting; log {supervisor.log_path})"
        )
        print(
            f"Ratchet gateway on http://{settings.host}:{settings.port}  engine: {engine}",
            flush=True,
        )
        if not settings.database_url:
            print(f"Chat key (embedded database): {dev_chat_key(settings, url)}", flush=True)
        # uvicorn re-raises the signal that stopped it once it has shut down; with the
        # default SIGTERM handler that would kill us before the embedded DB is stopped.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            access_log=False,
            log_level=settings.log_level,
            # Ours cuts streams cleanly at shutdown_grace_s; uvicorn's is the backstop.
            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 10,
        )
        GracefulServer(config, lambda: begin_shutdown(app)).run()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the app the moment a shutdown signal arrives, so that
    /readyz says so at once and the grace period starts."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        quiet_garbage_collector()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit and self.loop is not None:
            # A signal handler may not touch the loop directly.
            self.loop.call_soon_threadsafe(self.on_exit)
        super().handle_exit(sig, frame)


# Generation thresholds once the gateway has started (CPython's default: 700, 10, 10).
GC_THRESHOLDS = (100_000, 100, 1_000)


def quiet_garbage_collector() -> None:
    """Keep the cycle collector off the request path. What start-up built (modules,
    the app, pools, settings) lives as long as the process, yet every full collection
    walked all of it: under load, those pauses made single votes' p99 three times
    their median. Frozen, it is skipped; rarer collections cost less CPU a request
    (bench/vote_ingest.py: p99 101 → 31 ms, batched votes 8,300 → 9,100/s). Only for
    `ratchet serve`'s own process: a frozen object is never collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def dev_chat_key(settings: Settings, conninfo: str) -> str:
    """A chat key for the embedded default run, kept in data_dir so restarts reuse it."""
    import asyncio

    path: Path = settings.data_dir / "chat-key"

    async def get_or_create() -> str:
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            if path.is_file():
                secret = path.read_text().strip()
                if await keys.find_active(conn, secret) is not None:
                    return secret
            # The developer on their own machine tries what they register, so this key
            # may call `candidate`; production keys get the scope only on purpose.
            _, secret = await keys.create_key(
                conn, "chat", name="embedded default run", scopes=("candidate",)
            )
        path.unlink(missing_ok=True)
        # Created private: the secret must never sit in a world-readable file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        return secret

    return asyncio.run(get_or_create())
