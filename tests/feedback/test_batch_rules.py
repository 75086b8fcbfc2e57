"""`votes.cast_many` against the real Postgres: each ballot of a batch is checked in
order, as the single vote would be (the day cap counts the batch's own earlier votes,
a repeat is free and replaces), and a refused ballot stores nothing."""

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

from feedback import votes
from feedback.errors import NotTheOwner, UnknownCompletion, VoteCapExceeded
from feedback.voters import Caller, VoteRules
from feedback.votes import Ballot, Cast
from tests.feedback import factories as f
from tests.helpers import make_key


def owned_answer(conn: psycopg.Connection[Any], key_id: str, user: str | None) -> uuid.UUID:
    uid = f.answer(conn, "A question", "An answer" + f.LONG)
    conn.execute("UPDATE completions SET key_id = %s, end_user = %s WHERE id = %s",
                 (key_id, user, uid))  # fmt: skip
    return uid


def cast_many(url: str, ballots: list[tuple[Ballot, Caller]], rules: VoteRules) -> list[Cast]:
    async def go() -> list[Cast]:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            async with conn.transaction():
                return await votes.cast_many(conn, ballots, rules, datetime.now(UTC))

    return asyncio.run(go())


def test_a_batch_meets_the_cap_in_order_and_repeats_are_free(
    db: psycopg.Connection[Any], pairs_url: str
) -> None:
    key = make_key(pairs_url, "chat")[0]
    me, capped = uuid.UUID(key), VoteRules("any", 2)
    answers = [owned_answer(db, key, "alice") for _ in range(3)]
    bob = Caller(me, user="bob")
    done = cast_many(
        pairs_url,
        [
            (Ballot(completion_id=answers[0], rating=1), bob),
            (Ballot(completion_id=answers[0], rating=-1, comment="no"), bob),  # a repeat
            (Ballot(completion_id=answers[1], rating=1), bob),  # the second: at the cap
            (Ballot(completion_id=answers[2], rating=1), bob),  # over it
            (Ballot(completion_id=answers[2], rating=1), Caller(me, user="carol")),
            (Ballot(completion_id=uuid.uuid4(), rating=1), bob),
        ],
        capped,
    )
    assert [c.updated for c in done[:3]] == [False, True, False]
    assert done[0].vote is not None and done[0].vote.rating == 1  # what it said
    assert isinstance(done[3].error, VoteCapExceeded)
    assert 0 < done[3].error.retry_after <= 86400
    assert done[4].vote is not None and done[4].vote.end_user == "carol"
    assert isinstance(done[5].error, UnknownCompletion)
    rows = db.execute(
        "SELECT completion_id, end_user, rating, comment FROM votes ORDER BY end_user, rating"
    ).fetchall()
    assert sorted(rows) == sorted(
        [
            (answers[0], "bob", -1, "no"),
            (answers[1], "bob", 1, None),
            (answers[2], "carol", 1, None),
        ]
    )
    # The next batch sees the stored votes: bob is at his cap, a replacement is free.
    again = cast_many(
        pairs_url,
        [
            (Ballot(completion_id=answers[2], rating=1), bob),
            (Ballot(completion_id=answers[1], rating=-1), bob),
        ],
        capped,
    )
    assert isinstance(again[0].error, VoteCapExceeded)
    assert again[1].updated and again[1].vote is not None and again[1].vote.rating == -1


def test_owner_rules_and_other_keys_per_ballot(db: psycopg.Connection[Any], pairs_url: str) -> None:
    key, other = make_key(pairs_url, "chat")[0], make_key(pairs_url, "chat")[0]
    me, owner_only = uuid.UUID(key), VoteRules("owner", 500)
    answer = owned_answer(db, key, "alice")
    done = cast_many(
        pairs_url,
        [
            (Ballot(completion_id=answer, rating=1), Caller(me, user="mallory")),
            (Ballot(completion_id=answer, rating=1), Caller(uuid.UUID(other))),
            (Ballot(completion_id=answer, rating=-1), Caller(me)),
        ],
        owner_only,
    )
    assert isinstance(done[0].error, NotTheOwner)
    assert isinstance(done[1].error, UnknownCompletion)
    assert done[2].vote is not None and done[2].vote.end_user == "alice"
    assert db.execute("SELECT end_user, rating FROM votes").fetchall() == [("alice", -1)]
