"""Thumbs up/down on a logged answer, one per (completion, end user)."""

import uuid
from datetime import datetime

from psycopg import AsyncConnection, errors
from psycopg.rows import class_row
from pydantic import BaseModel

from feedback.errors import UnknownCompletion


class Vote(BaseModel):
    id: int
    completion_id: uuid.UUID
    end_user: str
    key_id: uuid.UUID | None
    rating: int
    comment: str | None
    correction: str | None
    created_at: datetime
    updated_at: datetime


async def upsert(
    conn: AsyncConnection,
    *,
    completion_id: uuid.UUID,
    rating: int,
    end_user: str = "",
    key_id: uuid.UUID | None = None,
    comment: str | None = None,
    correction: str | None = None,
    at: datetime | None = None,
) -> Vote:
    """Record a vote; a repeat by the same user on the same answer replaces it.

    `at` is when the gateway accepted it: a vote replayed late from the spool never
    replaces one accepted after it (last accepted wins, whatever the write order)."""
    try:
        async with conn.cursor(row_factory=class_row(Vote)) as cur:
            await cur.execute(
                "INSERT INTO votes (completion_id, end_user, key_id, rating, comment, correction,"
                " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s,"
                " coalesce(%s, now()), coalesce(%s, now()))"
                " ON CONFLICT (completion_id, end_user) DO UPDATE SET"
                " rating = EXCLUDED.rating, comment = EXCLUDED.comment,"
                " correction = EXCLUDED.correction, key_id = EXCLUDED.key_id,"
                " updated_at = EXCLUDED.updated_at"
                " WHERE votes.updated_at <= EXCLUDED.updated_at"
                " RETURNING *",
                (completion_id, end_user, key_id, rating, comment, correction, at, at),
            )
            vote = await cur.fetchone()
            if vote is None:  # a later vote is stored already; it stands
                await cur.execute(
                    "SELECT * FROM votes WHERE completion_id = %s AND end_user = %s",
                    (completion_id, end_user),
                )
                vote = await cur.fetchone()
    except errors.ForeignKeyViolation as exc:
        raise UnknownCompletion(f"no completion with id {completion_id}") from exc
    assert vote is not None
    return vote
