"""An answer's row is one statement sent in autocommit mode: committed when the write
returns, in one round trip, and the pooled connection goes back as it came."""

import asyncio
import uuid
from pathlib import Path

import psycopg
import pytest

from feedback.log import AnswerLog
from ratchet.db import DatabaseWatch, make_pool
from tests.feedback.conftest import empty
from tests.feedback.test_spool import record
from tests.helpers import query


def round_trips(trace: str) -> int:
    """Frontend-to-backend turns in a libpq trace."""
    sides = [line.split("\t")[0] for line in trace.splitlines() if line]
    return sum(1 for a, b in zip(sides, sides[1:], strict=False) if a == "F" and b == "B")


def test_an_answer_is_committed_in_one_round_trip(pairs_url: str, tmp_path: Path) -> None:
    empty(pairs_url)
    answer = record("Logged.")
    trace_path = tmp_path / "trace"

    async def run() -> None:
        pool = make_pool(pairs_url, 1)
        await pool.open()
        log = AnswerLog(pool, DatabaseWatch(pool, 0.2), None)
        async with pool.connection() as conn:  # the one connection the write will get
            assert not conn.autocommit
        with open(trace_path, "w") as trace:
            async with pool.connection() as conn:
                pass
            conn.pgconn.trace(trace.fileno())
            conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            await log.completion(answer)
            conn.pgconn.untrace()
        # Seen from another connection at once: committed.
        rows = query(pairs_url, "SELECT output FROM completions WHERE id = %s", answer.id)
        assert rows == [{"output": "Logged."}]
        async with pool.connection() as conn:
            assert not conn.autocommit  # as the pool gave it
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        await log.watch.aclose()
        await pool.close()

    asyncio.run(run())
    text = trace_path.read_text()
    # The INSERT with its commit: no BEGIN, no COMMIT, and no liveness round trip (the
    # connection was checked moments ago and its socket holds no goodbye).
    assert round_trips(text) == 1
    assert "BEGIN" not in text and "COMMIT" not in text


def test_a_refused_answer_leaves_the_connection_usable(pairs_url: str) -> None:
    empty(pairs_url)
    unknown_key = record().model_copy(update={"key_id": uuid.uuid4()})

    async def run() -> None:
        pool = make_pool(pairs_url, 1)
        await pool.open()
        log = AnswerLog(pool, DatabaseWatch(pool, 0.2), None)
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            await log.completion(unknown_key)
        await log.completion(record("Next."))
        async with pool.connection() as conn:
            assert not conn.autocommit
        await log.watch.aclose()
        await pool.close()

    asyncio.run(run())
    assert query(pairs_url, "SELECT output FROM completions") == [{"output": "Next."}]
