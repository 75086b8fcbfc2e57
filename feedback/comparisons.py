"""Pairwise A/B comparisons: two logged answers to one request, and the user's choice.

A comparison belongs to its key and end user like an answer (see `feedback.voters`);
the chooser is stored as a voter: (chooser_key_id, chooser)."""

import uuid
from datetime import datetime
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from feedback import voters
from feedback.errors import AlreadyDecided, UnknownComparison
from feedback.voters import Caller, VoteRules

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
    chooser_key_id: uuid.UUID | None = None
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


async def choose(
    conn: AsyncConnection,
    comparison_id: uuid.UUID,
    choice: Choice,
    caller: Caller,
    rules: VoteRules,
    at: datetime,
) -> Comparison:
    """Check who may choose and as whom, the day cap, then record the choice. Raises
    UnknownComparison (also for one the caller may not see), NotTheOwner,
    AlreadyDecided or VoteCapExceeded, writing nothing."""
    async with conn.cursor(row_factory=class_row(Comparison)) as cur:
        await cur.execute("SELECT * FROM comparisons WHERE id = %s FOR UPDATE", (comparison_id,))
        found = await cur.fetchone()
    if found is None:
        raise UnknownComparison(f"no comparison with id {comparison_id}")
    voter = voters.resolve(voters.owner(found.key_id, found.end_user), caller, rules.per_answer)
    if voter is None:  # another key's: exactly as if it did not exist
        raise UnknownComparison(f"no comparison with id {comparison_id}")
    if found.choice is not None:  # the first decision stands; repeating it is free
        if found.choice != choice:
            raise AlreadyDecided(str(comparison_id), found.choice)
        return found
    if rules.per_voter_per_day is not None:
        await voters.lock(conn, voter)
        await voters.check_day_cap(conn, voter, rules.per_voter_per_day)
    return await decide(conn, comparison_id, choice, voter.end_user, at, voter.key_id)


async def decide(
    conn: AsyncConnection,
    comparison_id: uuid.UUID,
    choice: Choice,
    chooser: str,
    at: datetime | None = None,
    chooser_key_id: uuid.UUID | None = None,
) -> Comparison:
    """Record the choice by the voter (chooser_key_id, chooser), already checked.
    Repeating the same choice is a no-op; a different one is refused."""
    async with conn.cursor(row_factory=class_row(Comparison)) as cur:
        await cur.execute(
            "UPDATE comparisons SET choice = %s, chooser = %s, chooser_key_id = %s,"
            " decided_at = coalesce(%s, now())"
            " WHERE id = %s AND choice IS NULL RETURNING *",
            (choice, chooser, chooser_key_id, at, comparison_id),
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
