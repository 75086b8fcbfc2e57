"""The `gateways` table: which gateway processes are alive, so that the streams of
one that died are swept to `aborted` by one that is not."""

import os
import socket
import uuid

from psycopg import AsyncConnection

from feedback import completions
from ratchet.processes import pid_alive


async def register(conn: AsyncConnection, gateway_id: uuid.UUID) -> None:
    await conn.execute(
        "INSERT INTO gateways (id, host, pid) VALUES (%s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET seen_at = now()",
        (gateway_id, socket.gethostname(), os.getpid()),
    )


async def beat(conn: AsyncConnection, gateway_id: uuid.UUID) -> None:
    await conn.execute("UPDATE gateways SET seen_at = now() WHERE id = %s", (gateway_id,))


async def gone(conn: AsyncConnection, me: uuid.UUID, stale_after_s: float) -> list[uuid.UUID]:
    """Gateways that are not alive: silent for `stale_after_s`, or on this host with a
    process that has exited (or whose pid is now ours: a restart in a container)."""
    rows = await (
        await conn.execute(
            "SELECT id, host, pid, seen_at < now() - make_interval(secs => %s) AS stale"
            " FROM gateways WHERE id <> %s",
            (stale_after_s, me),
        )
    ).fetchall()
    host, pid = socket.gethostname(), os.getpid()
    return [
        gid
        for gid, their_host, their_pid, stale in rows
        if stale or (their_host == host and (their_pid == pid or not pid_alive(their_pid)))
    ]


async def sweep(
    conn: AsyncConnection,
    me: uuid.UUID,
    live_streams: set[uuid.UUID],
    stale_after_s: float,
    max_stream_s: float,
) -> int:
    """Abort the streams of gateways that are gone; this gateway's own rows still
    `streaming` that no stream of it holds (their end could not be written); and rows
    of gateways that never registered (one that started and died while the database
    was down) once no stream could still be running. Forget gateways gone for a day.
    Returns how many rows were aborted."""
    dead = await gone(conn, me, stale_after_s)
    swept = await completions.sweep_streams(conn, dead)
    cur = await conn.execute(
        "UPDATE completions SET status = 'aborted', output = coalesce(output, '')"
        " WHERE status = 'streaming' AND ((gateway_id = %s AND NOT (id = ANY(%s)))"
        "  OR ((gateway_id IS NULL OR gateway_id NOT IN (SELECT id FROM gateways))"
        "   AND created_at < now() - make_interval(secs => %s)))",
        (me, list(live_streams), max_stream_s),
    )
    await conn.execute(
        "DELETE FROM gateways WHERE seen_at < now() - interval '1 day'"
        " AND NOT EXISTS (SELECT 1 FROM completions c WHERE c.status = 'streaming'"
        " AND c.gateway_id = gateways.id)"
    )
    return swept + cur.rowcount
