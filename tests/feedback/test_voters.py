"""Who may vote as whom, the day cap and the pair builder's voter cap, against the real
Postgres through the feedback functions (no gateway: the rules, not the HTTP)."""

import asyncio
import hashlib
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.types.json import Jsonb

from feedback import comparisons, votes
from feedback.errors import NotTheOwner, UnknownComparison, UnknownCompletion, VoteCapExceeded
from feedback.pairs.build import build, preview
from feedback.prompts import prompt_sha256
from feedback.voters import Caller, Voter, VoteRules
from feedback.votes import Ballot
from ratchet.config import PairSettings
from tests.feedback import factories as f
from tests.helpers import RATCHET, make_key

T = TypeVar("T")
ANY = VoteRules("any", None)


def run(conninfo: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
    """One transaction, as the answer log writes."""

    async def go() -> T:
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            async with conn.transaction():
                return await work(conn)

    return asyncio.run(go())


def owned_answer(conn: psycopg.Connection[Any], key_id: str, user: str | None) -> uuid.UUID:
    uid = f.answer(conn, "A question", "An answer" + f.LONG)
    conn.execute("UPDATE completions SET key_id = %s, end_user = %s WHERE id = %s",
                 (key_id, user, uid))  # fmt: skip
    return uid


def cast(url: str, answer: uuid.UUID, caller: Caller, rules: VoteRules, rating: int = 1) -> Voter:
    ballot = Ballot(completion_id=answer, rating=rating)
    vote = run(url, lambda conn: votes.cast(conn, ballot, caller, rules, datetime.now(UTC)))
    return Voter(key_id=vote.key_id, end_user=vote.end_user)


def test_with_any_every_end_user_of_the_key_votes_once(
    db: psycopg.Connection[Any], pairs_url: str
) -> None:
    key, other = make_key(pairs_url, "chat")[0], make_key(pairs_url, "chat")[0]
    ops = make_key(pairs_url, "ops")[0]
    answer = owned_answer(db, key, "alice")
    me = uuid.UUID(key)
    assert cast(pairs_url, answer, Caller(me, user="bob"), ANY) == Voter(key_id=me, end_user="bob")
    cast(pairs_url, answer, Caller(me, user="carol"), ANY, rating=-1)
    cast(pairs_url, answer, Caller(me, user="bob"), ANY, rating=-1)  # replaces bob's
    cast(pairs_url, answer, Caller(me), ANY)  # no user named: the owner
    # An ops key votes in the answer's key namespace, as the user it names.
    assert cast(pairs_url, answer, Caller(uuid.UUID(ops), ops=True, user="dan"), ANY) == Voter(
        key_id=me, end_user="dan"
    )
    with pytest.raises(UnknownCompletion):  # another key: the answer does not exist
        cast(pairs_url, answer, Caller(uuid.UUID(other), user="erin"), ANY)
    rows = db.execute(
        "SELECT key_id::text, end_user, rating FROM votes ORDER BY end_user"
    ).fetchall()
    assert rows == [(key, "alice", 1), (key, "bob", -1), (key, "carol", -1), (key, "dan", 1)]


def test_by_default_only_the_owner_votes_and_a_token_always_acts_as_the_owner(
    db: psycopg.Connection[Any], pairs_url: str
) -> None:
    key = make_key(pairs_url, "chat")[0]
    me, ops = uuid.UUID(key), uuid.UUID(make_key(pairs_url, "ops")[0])
    owned, anonymous = owned_answer(db, key, "alice"), owned_answer(db, key, None)
    owner_rules = VoteRules("owner", None)
    with pytest.raises(NotTheOwner):
        cast(pairs_url, owned, Caller(me, user="bob"), owner_rules)
    with pytest.raises(NotTheOwner):  # generated without a user: a vote names none
        cast(pairs_url, anonymous, Caller(me, user="alice"), owner_rules)
    assert cast(pairs_url, anonymous, Caller(me), owner_rules) == Voter(key_id=me, end_user="")
    # ops votes as the owner; so does a token, even when the setting is `any`.
    assert cast(pairs_url, owned, Caller(ops, ops=True), owner_rules).end_user == "alice"
    with pytest.raises(NotTheOwner):
        cast(pairs_url, owned, Caller(me, user="bob", as_owner=True), ANY)
    assert db.execute("SELECT count(*) FROM votes").fetchone() == (2,)


def test_the_day_cap_counts_votes_and_choices_but_never_blocks_a_replacement(
    db: psycopg.Connection[Any], pairs_url: str
) -> None:
    key = make_key(pairs_url, "chat")[0]
    me, capped = uuid.UUID(key), VoteRules("owner", 3)
    answers = [owned_answer(db, key, "alice") for _ in range(3)]
    cast(pairs_url, answers[0], Caller(me), capped)
    cast(pairs_url, answers[1], Caller(me), capped)
    a, b = f.answer(db, "Q", "one" + f.LONG), f.answer(db, "Q", "two" + f.LONG)
    compared = f.comparison(db, a, b, None)
    db.execute("UPDATE comparisons SET key_id = %s, end_user = 'alice' WHERE id = %s",
               (key, compared))  # fmt: skip

    def choose(conn: psycopg.AsyncConnection[Any]) -> Awaitable[comparisons.Comparison]:
        return comparisons.choose(conn, compared, "a", Caller(me), capped, datetime.now(UTC))

    assert run(pairs_url, choose).chooser_key_id == me  # the third: at the cap now
    with pytest.raises(VoteCapExceeded) as over:
        cast(pairs_url, answers[2], Caller(me), capped)
    assert 0 < over.value.retry_after <= 86400
    cast(pairs_url, answers[0], Caller(me), capped, rating=-1)  # changing one's mind
    assert run(pairs_url, choose).choice == "a"  # repeating a decided choice is free too
    assert db.execute("SELECT count(*) FROM votes WHERE completion_id = %s",
                      (answers[2],)).fetchone() == (0,)  # fmt: skip
    # Another end user of the same key is another voter, with a cap of its own.
    cast(pairs_url, answers[2], Caller(me, user="bob"), VoteRules("any", 3))


def test_choices_by_another_key_are_unknown(db: psycopg.Connection[Any], pairs_url: str) -> None:
    key, other = make_key(pairs_url, "chat")[0], make_key(pairs_url, "chat")[0]
    a, b = f.answer(db, "Q", "one" + f.LONG), f.answer(db, "Q", "two" + f.LONG)
    compared = f.comparison(db, a, b, None)
    db.execute("UPDATE comparisons SET key_id = %s WHERE id = %s", (key, compared))
    with pytest.raises(UnknownComparison):
        run(
            pairs_url,
            lambda conn: comparisons.choose(
                conn, compared, "a", Caller(uuid.UUID(other)), ANY, datetime.now(UTC)
            ),
        )
    assert db.execute("SELECT choice FROM comparisons").fetchone() == (None,)


def test_the_builder_caps_what_one_voter_makes(db: psycopg.Connection[Any], pairs_url: str) -> None:
    loud, quiet = make_key(pairs_url, "chat")[0], make_key(pairs_url, "chat")[0]
    for i in range(10):  # one correction pair each, on prompts of their own
        correct(db, loud, "lou", f"loud question {i}")
    for i in range(2):
        correct(db, quiet, "quinn", f"quiet question {i}")
    uncapped = preview(pairs_url, PairSettings(max_voter_share=1.0))
    assert uncapped.pairs["correction"] == 12 and "voter_cap" not in uncapped.dropped_pairs
    # Half the snapshot at most, counted against the other voter's 2 pairs: 2 kept.
    capped = preview(pairs_url, PairSettings(max_voter_share=0.5, min_voter_pairs=1))
    assert capped.pairs["correction"] == 4
    assert capped.dropped_pairs["voter_cap"] == 8
    assert sum(capped.kto.values()) == 0  # what was dropped gives no KTO rows either
    # The floor keeps small honest snapshots whole.
    floored = preview(pairs_url, PairSettings(max_voter_share=0.5, min_voter_pairs=10))
    assert floored.pairs["correction"] == 12


def test_the_voter_cap_ranks_each_voter_s_pairs_by_their_hash(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    """Thumbs pairs rest on every voter of both answers. A heavy voter behind all 30
    pairs keeps its first 3 (by the pair's hash), a medium one behind 10 keeps 6, and
    one-pair voters are never ranked; the result matches a reference computed here."""
    order: dict[int, str] = {}  # prompt -> the pair's hash, as the builder orders pairs
    for i in range(30):
        good, bad = f"Good answer {i}" + f.LONG, f"Bad answer {i}" + f.LONG
        up, down = f.answer(db, f"Question {i}?", good), f.answer(db, f"Question {i}?", bad)
        voters = ["hank", f"light{i}"] + (["mia"] if i < 10 else [])
        for voter in voters:
            f.vote(db, up, 1, voter)
            f.vote(db, down, -1, voter)
        sha = prompt_sha256(f.messages(f"Question {i}?"))
        ch, rh = (hashlib.md5(t.lower().encode()).hexdigest() for t in (good, bad))
        key = hashlib.md5(f"{sha}:{ch}:{rh}".encode()).hexdigest()  # the pair's key
        order[i] = hashlib.md5(key.encode()).hexdigest()
    # share 0.25: at most a third of the others' pairs, and never fewer than 3.
    settings = PairSettings(max_voter_share=0.25, min_voter_pairs=3)
    hank = sorted(range(30), key=order.__getitem__)
    mia = sorted(range(10), key=order.__getitem__)
    kept = set(hank[:3]) - set(mia[max(3, (30 - 10) // 3) :])
    assert kept  # the reference keeps some pairs, and not the same ones in cid order
    built = preview(pairs_url, settings)
    assert built.pairs["thumbs"] == len(kept)
    assert built.dropped_pairs["voter_cap"] == 30 - len(kept)
    snapshot = build(pairs_url, settings, tmp_path / "snapshots")
    chosen = db.execute("SELECT chosen FROM pairs WHERE snapshot_id = %s", (snapshot.id,))
    assert {row[0] for row in chosen} == {f"Good answer {i}" + f.LONG for i in kept}


def test_data_stats_shows_the_top_voters(db: psycopg.Connection[Any], pairs_url: str) -> None:
    loud = make_key(pairs_url, "chat", "loud-product")[0]
    for i in range(3):
        correct(db, loud, "lou", f"question {i}")
    correct(db, make_key(pairs_url, "chat", "quiet-product")[0], "quinn", "question 9")
    env = {**os.environ, "DATABASE_URL": pairs_url, "COLUMNS": "200"}
    shown = subprocess.run(
        [RATCHET, "data", "stats"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "Top voters" in shown
    lines = [line for line in shown.splitlines() if "product /" in line]
    assert "loud-product / lou" in lines[0] and "75.0%" in lines[0], shown
    assert "quiet-product / quinn" in lines[1] and "25.0%" in lines[1], shown


def correct(conn: psycopg.Connection[Any], key_id: str, user: str, question: str) -> None:
    """An answer of `key_id`'s voted down by its user with a correction: one pair."""
    answer = owned_answer(conn, key_id, user)
    messages = f.messages(question)
    conn.execute(
        "UPDATE completions SET messages = %s, prompt_sha256 = %s WHERE id = %s",
        (Jsonb(messages), prompt_sha256(messages), answer),
    )
    conn.execute(
        "INSERT INTO votes (completion_id, key_id, end_user, rating, correction)"
        " VALUES (%s, %s, %s, -1, %s)",
        (answer, key_id, user, f"A better answer to {question}" + f.LONG),
    )
