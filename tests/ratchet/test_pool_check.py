"""The pool's checkout check: free for a healthy idle connection, a round trip only
when the server has closed it (or it went unchecked for a while), so a restart or a
terminated backend never hands a dead connection to a writer."""

import asyncio
import time

import psycopg

from ratchet import db


async def _connect(url: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


def test_a_terminated_backend_fails_the_check_at_once(server_url: str) -> None:
    async def run() -> None:
        victim, admin = await _connect(server_url), await _connect(server_url)
        try:
            await db.check_connection(victim)  # checked now: the next check is free
            assert not db._readable(victim.fileno())
            await admin.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
            deadline = time.monotonic() + 5
            while not db._readable(victim.fileno()):
                assert time.monotonic() < deadline, "the server's goodbye never arrived"
                await asyncio.sleep(0.05)
            try:
                await db.check_connection(victim)
            except psycopg.OperationalError:
                pass
            else:
                raise AssertionError("a dead connection passed the check")
        finally:
            await victim.close()
            await admin.close()

    asyncio.run(run())


def test_the_pool_replaces_a_terminated_connection(server_url: str) -> None:
    async def run() -> None:
        pool = db.make_pool(server_url, 1)
        await pool.open()
        try:
            async with pool.connection() as conn:
                first = conn.info.backend_pid
            async with await _connect(server_url) as admin:
                await admin.execute("SELECT pg_terminate_backend(%s)", (first,))
            await asyncio.sleep(0.3)
            async with pool.connection() as conn:  # a working one, not the dead one
                await conn.execute("SELECT 1")
                second = conn.info.backend_pid
            assert second != first
        finally:
            await pool.close()

    asyncio.run(run())
