"""Thumbs up/down on a logged answer: one live vote per (answer, voter).

The voter is (key, end user); see `feedback.voters` for who may vote as whom."""

import uuid
from datetime import datetime

from psycopg import AsyncConnection, errors
from psycopg.rows import class_row
from pydantic import BaseModel

from feedback import voters
from feedback.errors import UnknownCompletion
from feedback.voters import Caller, Voter, VoteRules


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


class Ballot(BaseModel):
    """What a vote says, before it is known who casts it."""

    completion_id: uuid.UUID
    rating: int
    comment: str | None = None
    correction: str | None = None


async def owner(conn: AsyncConnection, completion_id: uuid.UUID) -> Voter | None:
    """The answer's owner (its key and end user); None for an unknown answer."""
    cur = await conn.execute(
        "SELECT key_id, end_user FROM completions WHERE id = %s", (completion_id,)
    )
    row = await cur.fetchone()
    return voters.owner(row[0], row[1]) if row else None


async def cast(
    conn: AsyncConnection, ballot: Ballot, caller: Caller, rules: VoteRules, at: datetime
) -> Vote:
    """Check who may vote and as whom, the day cap, then record the vote. Raises
    UnknownCompletion (also for an answer the caller may not see), NotTheOwner or
    VoteCapExceeded, writing nothing."""
    found = await owner(conn, ballot.completion_id)
    voter = voters.resolve(found, caller, rules.per_answer) if found is not None else None
    if voter is None:
        raise UnknownCompletion(f"no completion with id {ballot.completion_id}")
    if rules.per_voter_per_day is not None:
        await voters.lock(conn, voter)
        if await _live(conn, ballot.completion_id, voter) is None:  # a replacement is free
            await voters.check_day_cap(conn, voter, rules.per_voter_per_day)
    return await upsert(
        conn,
        completion_id=ballot.completion_id,
        rating=ballot.rating,
        end_user=voter.end_user,
        key_id=voter.key_id,
        comment=ballot.comment,
        correction=ballot.correction,
        at=at,
    )


async def _live(conn: AsyncConnection, completion_id: uuid.UUID, voter: Voter) -> Vote | None:
    async with conn.cursor(row_factory=class_row(Vote)) as cur:
        await cur.execute(
            "SELECT * FROM votes WHERE completion_id = %s AND key_id IS NOT DISTINCT FROM %s"
            " AND end_user = %s",
            (completion_id, voter.key_id, voter.end_user),
        )
        return await cur.fetchone()


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
    """Record a vote as the voter (key_id, end_user), already checked; a repeat by the
    same voter on the same answer replaces it.

    `at` is when the gateway accepted it: a vote replayed late from the spool never
    replaces one accepted after it (last accepted wins, whatever the write order)."""
    try:
        async with conn.cursor(row_factory=class_row(Vote)) as cur:
            await cur.execute(
                "INSERT INTO votes (completion_id, end_user, key_id, rating, comment, correction,"
                " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s,"
                " coalesce(%s, now()), coalesce(%s, now()))"
                " ON CONFLICT (completion_id, key_id, end_user) DO UPDATE SET"
                " rating = EXCLUDED.rating, comment = EXCLUDED.comment,"
                " correction = EXCLUDED.correction, updated_at = EXCLUDED.updated_at"
                " WHERE votes.updated_at <= EXCLUDED.updated_at"
                " RETURNING *",
                (completion_id, end_user, key_id, rating, comment, correction, at, at),
            )
            vote = await cur.fetchone()
        if vote is None:  # a later vote is stored already; it stands
            vote = await _live(conn, completion_id, Voter(key_id=key_id, end_user=end_user))
    except errors.ForeignKeyViolation as exc:
        raise UnknownCompletion(f"no completion with id {completion_id}") from exc
    assert vote is not None
    return vote
