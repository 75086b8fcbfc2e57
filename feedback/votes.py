"""Thumbs up/down on a logged answer: one live vote per (answer, voter).

The voter is (key, end user); see `feedback.voters` for who may vote as whom.

`cast_many` records up to a batch of votes in one transaction with a fixed number of
statements, whatever the batch's size: the answers' owners, the voters' locks, their
day counts and live votes, then one upsert. A single vote is a batch of one.
"""

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, errors
from psycopg.rows import args_row
from pydantic import BaseModel

from feedback import voters
from feedback.errors import (
    FeedbackError,
    NotTheOwner,
    UnknownCompletion,
    VoteCapExceeded,
    VoterBusy,
)
from feedback.voters import Caller, Voter, VoteRules


@dataclass(frozen=True, slots=True)
class Vote:
    """A stored vote, as its row. A dataclass, not a model: a batch reads hundreds
    (validating each again cost more than the rest of the batch's bookkeeping)."""

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


@dataclass(frozen=True)
class Cast:
    """One ballot's outcome: the stored vote, or why nothing was stored for it."""

    vote: Vote | None = None
    error: FeedbackError | None = None
    # Whether it replaced a live vote of the same voter (one stored before, or an
    # earlier ballot of the same batch).
    updated: bool = False


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
    UnknownCompletion (also for an answer the caller may not see), NotTheOwner,
    VoteCapExceeded or VoterBusy, writing nothing."""
    (done,) = await cast_many(conn, [(ballot, caller)], rules, at)
    if done.error is not None:
        raise done.error
    assert done.vote is not None
    return done.vote


async def cast_many(
    conn: AsyncConnection,
    ballots: Sequence[tuple[Ballot, Caller]],
    rules: VoteRules,
    at: datetime,
) -> list[Cast]:
    """Each ballot checked as `cast` checks one, in order (a later ballot of a voter
    sees the earlier ones: a repeat replaces, the cap counts them), in the caller's
    transaction. A refused ballot stores nothing and keeps no other from being
    stored. VoterBusy (a voter's lock held past its timeout) refuses them all; so
    does UnknownCompletion when an answer disappears meanwhile."""
    capped = rules.per_voter_per_day is not None
    found = await _owners_locked(conn, ballots, rules) if capped else await _owners(conn, ballots)
    resolved: list[Voter | FeedbackError] = [_resolve(found, b, c, rules) for b, c in ballots]
    who = list({v for v in resolved if isinstance(v, Voter)})
    if len(ballots) == 1 and capped and isinstance(resolved[0], Voter):
        return [await _cast_one(conn, ballots[0][0], resolved[0], rules, at)]
    live: set[tuple[uuid.UUID, Voter]] = set()
    if rules.per_voter_per_day is not None and who:
        pairs = [(b.completion_id, v) for (b, _), v in zip(ballots, resolved, strict=True)]
        counts, live = await _state(conn, who, [(c, v) for c, v in pairs if isinstance(v, Voter)])
        resolved = _apply_cap(pairs, counts, live, rules.per_voter_per_day)
    rows: dict[tuple[uuid.UUID, Voter], Ballot] = {}
    for (ballot, _), voter in zip(ballots, resolved, strict=True):
        if isinstance(voter, Voter):
            rows[(ballot.completion_id, voter)] = ballot  # the last ballot of a voter wins
    stored = await _upsert_many(conn, rows, at)
    return _outcomes(ballots, resolved, rows, stored, live)


def _resolve(
    found: dict[uuid.UUID, Voter], ballot: Ballot, caller: Caller, rules: VoteRules
) -> Voter | FeedbackError:
    answer_owner = found.get(ballot.completion_id)
    try:
        voter = voters.resolve(answer_owner, caller, rules.per_answer) if answer_owner else None
    except NotTheOwner as exc:
        return exc
    if voter is None:
        return UnknownCompletion(f"no completion with id {ballot.completion_id}")
    return voter


def _apply_cap(
    pairs: list[tuple[uuid.UUID, Voter | FeedbackError]],
    counts: dict[Voter, tuple[int, int]],
    live: set[tuple[uuid.UUID, Voter]],
    cap: int,
) -> list[Voter | FeedbackError]:
    """Each ballot in order against its voter's day count; a vote on an answer the
    voter already voted on (before, or earlier in the batch) is free."""
    seen = set(live)
    used = {voter: n for voter, (n, _) in counts.items()}
    out: list[Voter | FeedbackError] = []
    for completion_id, voter in pairs:
        if isinstance(voter, Voter) and (completion_id, voter) not in seen:
            if voter.key_id is not None and used.get(voter, 0) >= cap:
                retry = counts.get(voter, (0, 86_400))[1]  # its first vote is in this batch
                out.append(VoteCapExceeded(cap, retry_after=retry))
                continue
            used[voter] = used.get(voter, 0) + 1
            seen.add((completion_id, voter))
        out.append(voter)
    return out


def _outcomes(
    ballots: Sequence[tuple[Ballot, Caller]],
    resolved: list[Voter | FeedbackError],
    rows: dict[tuple[uuid.UUID, Voter], Ballot],
    stored: dict[tuple[uuid.UUID, Voter], Vote],
    live: set[tuple[uuid.UUID, Voter]],
) -> list[Cast]:
    seen = set(live)
    out: list[Cast] = []
    for (ballot, _), voter in zip(ballots, resolved, strict=True):
        if not isinstance(voter, Voter):
            out.append(Cast(error=voter))
            continue
        pair = (ballot.completion_id, voter)
        vote = stored[pair]
        updated = pair in seen or vote.updated_at != vote.created_at
        seen.add(pair)
        if rows[pair] is not ballot:  # replaced later in this batch: answer what it said
            comment, correction = ballot.comment, ballot.correction
            vote = replace(vote, rating=ballot.rating, comment=comment, correction=correction)
        out.append(Cast(vote=vote, updated=updated))
    return out


async def _owners(
    conn: AsyncConnection, ballots: Sequence[tuple[Ballot, Caller]]
) -> dict[uuid.UUID, Voter]:
    ids = list({b.completion_id for b, _ in ballots})
    cur = await conn.execute(
        "SELECT id, key_id, end_user FROM completions WHERE id = ANY(%s)", (ids,)
    )
    return {row[0]: voters.owner(row[1], row[2]) for row in await cur.fetchall()}


# The answers' owners, and in the same statement the lock of every voter a ballot may
# vote as (`voters.resolve` in SQL, erring on the side of locking: another end user
# than the owner, refused later, locks the owner), taken in one order (by hash, as
# `voters.lock`), so that two batches sharing voters cannot deadlock.
_OWNERS_LOCKED = (
    "WITH ask AS (SELECT * FROM jsonb_to_recordset(%(ask)s::jsonb)"
    "  AS a(id uuid, caller uuid, ops bool, named text, own bool)),"
    " found AS (SELECT DISTINCT c.id, c.key_id, coalesce(c.end_user, '') AS end_user,"
    "  CASE WHEN coalesce(a.named, '') = '' OR %(owner_only)s OR a.own"
    "   THEN coalesce(c.end_user, '') ELSE a.named END AS voter,"
    "  a.ops OR c.key_id = a.caller AS visible"
    "  FROM ask a JOIN completions c ON c.id = a.id),"
    " locked AS (SELECT count(pg_advisory_xact_lock(h)) AS n FROM (SELECT DISTINCT"
    "  hashtextextended('voter:' || coalesce(key_id::text, 'None') || ':' || voter, 0) AS h"
    "  FROM found WHERE visible ORDER BY h) AS s)"
    " SELECT DISTINCT id, key_id, end_user, (SELECT n FROM locked) FROM found"
)


async def _owners_locked(
    conn: AsyncConnection, ballots: Sequence[tuple[Ballot, Caller]], rules: VoteRules
) -> dict[uuid.UUID, Voter]:
    ask = [
        {
            "id": str(b.completion_id),
            "caller": voters.key_text(c.key_id),
            "ops": c.ops,
            "named": c.user,
            "own": c.as_owner,
        }
        for b, c in ballots
    ]
    params = {"ask": _json(ask), "owner_only": rules.per_answer == "owner"}
    try:
        async with conn.pipeline():
            await conn.execute("SET LOCAL lock_timeout = '1s'")
            cur = await conn.execute(_OWNERS_LOCKED, params)
            rows = await cur.fetchall()
    except errors.LockNotAvailable as exc:
        raise VoterBusy("this voter's other votes are being written; retry in a moment") from exc
    return {row[0]: voters.owner(row[1], row[2]) for row in rows}


async def _state(
    conn: AsyncConnection, who: list[Voter], pairs: list[tuple[uuid.UUID, Voter]]
) -> tuple[dict[Voter, tuple[int, int]], set[tuple[uuid.UUID, Voter]]]:
    """The voters' day counts (with seconds until their oldest leaves the window) and
    which (answer, voter) pairs have a live vote. Call under the voters' locks."""
    async with conn.pipeline():
        counted = await conn.execute(voters.DAY_COUNTS, voters.day_count_params(who))
        cur = await conn.execute(
            _LIVE_PAIRS,
            (_json([{"c": str(c), "k": v.key_text, "u": v.end_user} for c, v in pairs]),),
        )
        counts = await counted.fetchall()
        rows = await cur.fetchall()
    found = {voters.owner(r[0], r[1]): (int(r[2]), max(1, int(r[3] or 0) + 1)) for r in counts}
    live = {(row[0], voters.owner(row[1], row[2])) for row in rows}
    return found, live


# Which of the pairs have a live vote: one probe of the voter index per pair.
# (`key_id IS NOT DISTINCT FROM` cannot be an index condition: it made this a hash
# join over a scan of the whole votes table, once per batch; LATERAL keeps the
# planner from hashing the subquery over such a scan too.)
_LIVE_PAIRS = (
    "SELECT p.c, p.k, p.u FROM jsonb_to_recordset(%s::jsonb) AS p(c uuid, k uuid, u text),"
    " LATERAL (SELECT 1 FROM votes v"
    "  WHERE v.completion_id = p.c AND v.key_id = p.k AND v.end_user = p.u"
    "  UNION ALL SELECT 1 FROM votes v WHERE p.k IS NULL"
    "  AND v.completion_id = p.c AND v.key_id IS NULL AND v.end_user = p.u LIMIT 1) AS l"
)


# The condition on `key_id` for one voter, by whether it has none, as an index
# condition: `IS NOT DISTINCT FROM` a parameter is not one (a generic plan then reads
# every vote on the answer).
_SAME_KEY = {False: "key_id = %(k)s", True: "key_id IS NULL"}


# One vote under its voter's lock: the day cap and the upsert in one statement. It is
# stored when the voter already voted on the answer (a replacement is free) or cast
# fewer than the cap in the last 24 hours; the counts come back either way.
_CAST_ONE_SQL = (
    "WITH live AS (SELECT 1 FROM votes WHERE completion_id = %(c)s"
    "  AND {same_key} AND end_user = %(u)s),"
    " mine AS ("
    " SELECT created_at AS at FROM votes WHERE key_id = %(k)s AND end_user = %(u)s"
    "  AND created_at > now() - interval '1 day'"
    " UNION ALL"
    " SELECT decided_at FROM comparisons WHERE chooser_key_id = %(k)s AND chooser = %(u)s"
    "  AND decided_at > now() - interval '1 day'),"
    " used AS (SELECT count(*) AS n,"
    "  extract(epoch FROM min(at) + interval '1 day' - now()) AS wait FROM mine),"
    " ins AS (INSERT INTO votes (completion_id, end_user, key_id, rating, comment,"
    "  correction, created_at, updated_at)"
    "  SELECT %(c)s, %(u)s, %(k)s, %(r)s, %(cm)s, %(cr)s, %(at)s, %(at)s"
    "  WHERE EXISTS (SELECT 1 FROM live) OR %(k)s::uuid IS NULL"
    "   OR (SELECT n FROM used) < %(cap)s"
    "  ON CONFLICT (completion_id, key_id, end_user) DO UPDATE SET"
    "  rating = EXCLUDED.rating, comment = EXCLUDED.comment,"
    "  correction = EXCLUDED.correction, updated_at = EXCLUDED.updated_at"
    "  WHERE votes.updated_at <= EXCLUDED.updated_at RETURNING id, completion_id, end_user,"
    "  key_id, rating, comment, correction, created_at, updated_at)"
    " SELECT ins.*, EXISTS (SELECT 1 FROM live) AS live, (SELECT wait FROM used) AS wait"
    " FROM (SELECT 1) AS one LEFT JOIN ins ON true"
)
_CAST_ONE = {keyless: _CAST_ONE_SQL.format(same_key=sql) for keyless, sql in _SAME_KEY.items()}


async def _cast_one(
    conn: AsyncConnection, ballot: Ballot, voter: Voter, rules: VoteRules, at: datetime
) -> Cast:
    """A single vote, already resolved and under its voter's lock (a batch of one, in
    one statement where a batch takes two)."""
    assert rules.per_voter_per_day is not None
    params = {
        "c": ballot.completion_id,
        "u": voter.end_user,
        "k": voter.key_id,
        "r": ballot.rating,
        "cm": ballot.comment,
        "cr": ballot.correction,
        "at": at,
        "cap": rules.per_voter_per_day,
    }
    try:
        cur = await conn.execute(_CAST_ONE[voter.key_id is None], params)
        row = await cur.fetchone()
    except errors.ForeignKeyViolation as exc:
        raise UnknownCompletion(f"no completion with id {ballot.completion_id}") from exc
    assert row is not None
    *columns, live, wait = row
    if columns[0] is not None:
        vote = Vote(*columns)
        return Cast(vote=vote, updated=live or vote.updated_at != vote.created_at)
    if live:  # a later vote is stored already; it stands
        stood = await _live(conn, ballot.completion_id, voter)
        assert stood is not None
        return Cast(vote=stood, updated=True)
    retry = max(1, int(wait or 0) + 1)
    return Cast(error=VoteCapExceeded(rules.per_voter_per_day, retry_after=retry))


async def _upsert_many(
    conn: AsyncConnection, rows: dict[tuple[uuid.UUID, Voter], Ballot], at: datetime
) -> dict[tuple[uuid.UUID, Voter], Vote]:
    """One statement for every vote; a vote accepted later than `at` stands."""
    if not rows:
        return {}
    items = list(rows.items())
    try:
        async with conn.cursor(row_factory=args_row(Vote)) as cur:
            await cur.execute(
                "INSERT INTO votes (completion_id, end_user, key_id, rating, comment,"
                " correction, created_at, updated_at)"
                " SELECT c, u, k, r, cm, cr, %s, %s FROM jsonb_to_recordset(%s::jsonb)"
                "  AS b(c uuid, u text, k uuid, r smallint, cm text, cr text)"
                " ON CONFLICT (completion_id, key_id, end_user) DO UPDATE SET"
                " rating = EXCLUDED.rating, comment = EXCLUDED.comment,"
                " correction = EXCLUDED.correction, updated_at = EXCLUDED.updated_at"
                " WHERE votes.updated_at <= EXCLUDED.updated_at"
                " RETURNING " + _VOTE_COLUMNS,
                (at, at, _json([_row(pair, ballot) for pair, ballot in items])),
            )
            votes = await cur.fetchall()
    except errors.ForeignKeyViolation as exc:
        raise UnknownCompletion("an answer voted on no longer exists") from exc
    stored = {(v.completion_id, voters.owner(v.key_id, v.end_user)): v for v in votes}
    for pair in rows.keys() - stored.keys():  # a later vote is stored already; it stands
        vote = await _live(conn, *pair)
        assert vote is not None
        stored[pair] = vote
    return stored


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
        async with conn.cursor(row_factory=args_row(Vote)) as cur:
            await cur.execute(
                "INSERT INTO votes (completion_id, end_user, key_id, rating, comment, correction,"
                " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s,"
                " coalesce(%s, now()), coalesce(%s, now()))"
                " ON CONFLICT (completion_id, key_id, end_user) DO UPDATE SET"
                " rating = EXCLUDED.rating, comment = EXCLUDED.comment,"
                " correction = EXCLUDED.correction, updated_at = EXCLUDED.updated_at"
                " WHERE votes.updated_at <= EXCLUDED.updated_at"
                " RETURNING " + _VOTE_COLUMNS,
                (completion_id, end_user, key_id, rating, comment, correction, at, at),
            )
            vote = await cur.fetchone()
        if vote is None:  # a later vote is stored already; it stands
            vote = await _live(conn, completion_id, Voter(key_id=key_id, end_user=end_user))
    except errors.ForeignKeyViolation as exc:
        raise UnknownCompletion(f"no completion with id {completion_id}") from exc
    assert vote is not None
    return vote


_VOTE_COLUMNS = ", ".join(f.name for f in fields(Vote))  # in Vote's order (args_row)


def _row(pair: tuple[uuid.UUID, Voter], ballot: Ballot) -> dict[str, object]:
    completion_id, voter = pair
    return {
        "c": str(completion_id),
        "u": voter.end_user,
        "k": voter.key_text,
        "r": ballot.rating,
        "cm": ballot.comment,
        "cr": ballot.correction,
    }


def _json(rows: list[dict[str, Any]]) -> str:
    """A batch's rows as one JSON parameter (`jsonb_to_recordset`): one C-speed dump,
    where psycopg dumps each element of a list parameter in Python."""
    return json.dumps(rows, default=str)


async def _live(conn: AsyncConnection, completion_id: uuid.UUID, voter: Voter) -> Vote | None:
    async with conn.cursor(row_factory=args_row(Vote)) as cur:
        await cur.execute(
            "SELECT "
            + _VOTE_COLUMNS
            + " FROM votes WHERE completion_id = %(c)s AND "
            + _SAME_KEY[voter.key_id is None]
            + " AND end_user = %(u)s",
            {"c": completion_id, "k": voter.key_id, "u": voter.end_user},
        )
        return await cur.fetchone()
