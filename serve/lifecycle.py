"""The gateway's own housekeeping, and its graceful shutdown.

Housekeeping: register this process in `gateways`, beat its heartbeat, and sweep to
`aborted` the streams that gateways which died left `streaming` (at start, then
every few beats). Shutdown: on SIGTERM the gateway stops being ready at once, lets
requests in flight finish for `shutdown_grace_s`, then cuts what is left (streams
get an error event and are `aborted`, answers still generating get 503).
"""

import asyncio
import contextlib
import logging
import uuid

from psycopg_pool import AsyncConnectionPool

from feedback import gateways
from ratchet.db import DatabaseWatch, unavailable
from serve.chat import ChatService

log = logging.getLogger(__name__)
SWEEP_EVERY = 6  # heartbeats between two sweeps
STALE_BEATS = 6  # a gateway silent this many heartbeats is gone


class Housekeeping:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        watch: DatabaseWatch,
        chat: ChatService,
        gateway_id: uuid.UUID,
        heartbeat_s: float,
    ) -> None:
        self.pool = pool
        self.watch = watch
        self.chat = chat
        self.gateway_id = gateway_id
        self.heartbeat_s = heartbeat_s
        self.registered = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="gateway-housekeeping")

    async def aclose(self) -> None:
        """Stop beating; a last sweep marks this gateway's own unfinished rows (streams
        whose end could not be written) `aborted` while the database answers."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.watch.up and self.registered:
            with contextlib.suppress(Exception):
                await self.beat(sweep=True)

    async def _loop(self) -> None:
        beats = 0
        while True:
            if self.watch.up:
                try:
                    await self.beat(sweep=beats % SWEEP_EVERY == 0)
                    beats += 1
                except Exception as exc:
                    if unavailable(exc):
                        self.watch.failed(exc)
                    else:
                        log.exception("gateway housekeeping failed")
            await asyncio.sleep(self.heartbeat_s)

    async def beat(self, sweep: bool) -> int:
        """One heartbeat (registering first if needed); with `sweep`, abort the streams
        of gateways that are gone. Returns how many rows were swept."""
        async with self.pool.connection() as conn:
            if not self.registered:
                await gateways.register(conn, self.gateway_id)
                self.registered = sweep = True
            else:
                await gateways.beat(conn, self.gateway_id)
            if not sweep:
                return 0
            swept = await gateways.sweep(
                conn,
                self.gateway_id,
                set(self.chat.streams),
                stale_after_s=self.heartbeat_s * STALE_BEATS,
                max_stream_s=self.chat.total_timeout + 60,
            )
        if swept:
            log.warning("swept %d stream(s) left unfinished to 'aborted'", swept)
        return swept


class Shutdown:
    """The shutdown sequence's first half, started from the signal handler."""

    def __init__(self, chat: ChatService, grace_s: float) -> None:
        self.chat = chat
        self.grace_s = grace_s
        self.draining = False
        self._cutter: asyncio.Task[None] | None = None

    def begin(self) -> None:
        """Not ready from now on; cut what is still running after the grace period."""
        if self.draining:
            return
        self.draining = True
        log.warning(
            "shutting down: %d stream(s) in flight, %.0f s to finish",
            len(self.chat.streams),
            self.grace_s,
        )
        self._cutter = asyncio.get_running_loop().create_task(self._cut_after_grace())

    async def _cut_after_grace(self) -> None:
        await asyncio.sleep(self.grace_s)
        if self.chat.streams:
            log.warning("grace period over: cutting %d stream(s)", len(self.chat.streams))
        self.chat.cut_all()

    async def aclose(self) -> None:
        if self._cutter is not None:
            self._cutter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cutter
