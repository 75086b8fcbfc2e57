"""Pairwise A/B comparisons: two logged answers to one request, and the user's choice."""

import uuid
from datetime import datetime
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from feedback.errors import AlreadyDecided, UnknownComparison

Choice = Literal["a", "b", "tie", "both_bad"]


class Comparison(BaseModel):
    id: uuid.UUID
    created_at: datetime
    key_id: uuid.UUID | None
    end_user: str | None
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    completion_a: uuid.UUID
    completion_b: uuid.UUID
    choice: Choice | None
    chooser: str | None
    decided_at: datetime | None


async def create(
    conn: AsyncConnection,
    *,
    comparison_id: uuid.UUID,
    key_id: uuid.UUID | None,
    end_user: str | None,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    completion_a: uuid.UUID,
    completion_b: uuid.UUID,
    created_at: datetime | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO comparisons (id, key_id, end_user, messages, params,"
        " completion_a, completion_b, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, coalesce(%s, now()))"
        " ON CONFLICT (id) DO NOTHING",  # idempotent: replays from the spool
        (
            comparison_id,
            key_id,
            end_user,
            Jsonb(messages),
            Jsonb(params),
            completion_a,
            completion_b,
            created_at,
        ),
    )


async def decide(
    conn: AsyncConnection,
    comparison_id: uuid.UUID,
    choice: Choice,
    chooser: str,
    at: datetime | None = None,
) -> Comparison:
    """Record the choice. Repeating the same choice is a no-op; a different one is refused."""
    async with conn.cursor(row_factory=class_row(Comparison)) as cur:
        await cur.execute(
            "UPDATE comparisons SET choice = %s, chooser = %s, decided_at = coalesce(%s, now())"
            " WHERE id = %s AND choice IS NULL RETURNING *",
            (choice, chooser, at, comparison_id),
        )
        decided = await cur.fetchone()
        if decided is not None:
            return decided
        await cur.execute("SELECT * FROM comparisons WHERE id = %s", (comparison_id,))
        existing = await cur.fetchone()
    if existing is None:
        raise UnknownComparison(f"no comparison with id {comparison_id}")
    if existing.choice != choice:
        raise AlreadyDecided(str(comparison_id), str(existing.choice))
    return existing
