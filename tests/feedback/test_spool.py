"""The spool and the answer log's replay, against a real Postgres and an unreachable one.

A database that is down is a real server address where nothing listens: the answer
log gets the same connection errors as when Postgres stops.
"""

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from feedback import completions, voters, votes
from feedback.completions import CompletionRecord
from feedback.errors import NotTheOwner, StorageUnavailable
from feedback.log import AnswerLog, apply_op
from feedback.spool import Spool, SpoolFile, read_entries
from feedback.voters import Caller, VoteRules
from feedback.votes import Ballot
from ratchet.db import DatabaseWatch, make_pool
from tests.feedback.conftest import empty
from tests.helpers import free_port, make_key, query

OPS = Caller(key_id=None, ops=True)  # the answers below were received by no key
RULES = VoteRules("owner", 500)  # the day cap is not counted while the database is down


def record(text: str = "An answer.") -> CompletionRecord:
    messages = [{"role": "user", "content": "Hi"}]
    return CompletionRecord(
        id=uuid.uuid4(),
        key_id=None,
        end_user="alice",
        public_model="production",
        engine_model="base",
        adapter_id=None,
        adapter_sha256=None,
        base_model_sha256=None,
        messages=messages,
        params={"max_tokens": 8},
        prompt_sha256=completions.prompt_sha256(messages),
        stream=False,
        output=text,
    )


async def open_log(url: str, spool_dir: Path | None, max_bytes: int = 1 << 20) -> AnswerLog:
    pool = make_pool(url, 2, acquire_timeout=0.5, connect_timeout=1)
    await pool.open()
    log = AnswerLog(
        pool, DatabaseWatch(pool, 0.2), Spool(spool_dir, max_bytes) if spool_dir else None
    )
    log.open()
    return log


async def close_log(log: AnswerLog) -> None:
    await log.aclose()
    await log.watch.aclose()
    await log.pool.close()


def down_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"


def test_a_torn_last_line_is_cut_before_anything_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "spool-0.jsonl"
    path.write_bytes(b'[{"op":"a"}]\n[{"op":"b"}]\n[{"op":"c"')  # died mid-write
    spool = SpoolFile.claim(path)
    assert spool is not None and spool.lines == 2
    spool.append(b'[{"op":"d"}]\n')
    spool.close()
    assert [e[0]["op"] for e, _ in read_entries(path)] == ["a", "b", "d"]


def test_a_spool_file_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    first = SpoolFile.claim(tmp_path / "spool-0.jsonl")
    assert first is not None
    assert SpoolFile.claim(tmp_path / "spool-0.jsonl") is None  # locked
    first.close()
    again = SpoolFile.claim(tmp_path / "spool-0.jsonl")
    assert again is not None
    again.close()


def test_writes_while_the_database_is_down_are_replayed_by_the_next_gateway(
    pairs_url: str, tmp_path: Path
) -> None:
    empty(pairs_url)
    answer, spooled_at = record("Spooled."), tmp_path / "spool"

    async def while_down() -> None:
        log = await open_log(down_url(), spooled_at)
        await log.completion(answer)  # the database is down: it goes to the spool
        ballot = Ballot(completion_id=answer.id, rating=1, comment="good")
        receipt = await log.vote(ballot, OPS, VoteRules())
        assert receipt.comment == "good" and log.spooling and log.spool is not None
        assert receipt.voter == voters.owner(None, "alice")  # ops votes as the owner
        assert log.spool.depth == 2
        with pytest.raises(StorageUnavailable):  # not an answer this gateway gave
            await log.vote(Ballot(completion_id=uuid.uuid4(), rating=1), OPS, VoteRules())
        # The process dies: its lock goes, its file stays.
        assert log.spool is not None and log.spool.own is not None
        log.spool.own.close()
        log.spool.own = None
        await log.watch.aclose()
        await log.pool.close()

    async def next_gateway() -> None:
        log = await open_log(pairs_url, spooled_at)
        assert await log.flush(timeout=30)
        assert log.stats.replayed == 2 and log.spool is not None and log.spool.depth == 0
        await close_log(log)

    asyncio.run(while_down())
    asyncio.run(next_gateway())
    rows = query(pairs_url, "SELECT output FROM completions WHERE id = %s", answer.id)
    assert [r["output"] for r in rows] == ["Spooled."]
    vote = query(pairs_url, "SELECT rating, comment FROM votes WHERE completion_id = %s", answer.id)
    assert vote == [{"rating": 1, "comment": "good"}]


def test_while_down_the_owner_rules_hold_and_the_voters_are_replayed(
    pairs_url: str, tmp_path: Path
) -> None:
    empty(pairs_url)
    key_id = uuid.UUID(make_key(pairs_url, "chat")[0])
    other = Caller(key_id=uuid.UUID(make_key(pairs_url, "chat")[0]))
    answer, a, b = (record(t).model_copy(update={"key_id": key_id}) for t in ("x", "a", "b"))
    comparison, spooled_at = uuid.uuid4(), tmp_path / "spool"

    async def while_down() -> None:
        log = await open_log(down_url(), spooled_at)
        await log.completion(answer)
        await log.comparison(a, b, comparison_id=comparison, key_id=key_id, end_user="alice")
        with pytest.raises(StorageUnavailable):  # another key's: the same as unknown here
            await log.vote(Ballot(completion_id=answer.id, rating=1), other, VoteRules())
        with pytest.raises(NotTheOwner):
            await log.vote(
                Ballot(completion_id=answer.id, rating=1), Caller(key_id, user="bob"), VoteRules()
            )
        with pytest.raises(StorageUnavailable):
            await log.choice(comparison, "a", other, VoteRules())
        receipt = await log.vote(Ballot(completion_id=answer.id, rating=-1), Caller(key_id), RULES)
        assert receipt.voter == voters.owner(key_id, "alice")
        assert await log.choice(comparison, "b", Caller(key_id, user="alice"), RULES) == "b"
        await close_log(log)

    async def back_up() -> None:
        log = await open_log(pairs_url, spooled_at)
        assert await log.flush(timeout=30)
        await close_log(log)

    asyncio.run(while_down())
    asyncio.run(back_up())
    assert query(pairs_url, "SELECT key_id, end_user, rating FROM votes") == [
        {"key_id": key_id, "end_user": "alice", "rating": -1}
    ]
    assert query(pairs_url, "SELECT choice, chooser, chooser_key_id FROM comparisons") == [
        {"choice": "b", "chooser": "alice", "chooser_key_id": key_id}
    ]


def test_a_full_spool_refuses_and_writes_nothing(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, str]:
        log = await open_log(down_url(), tmp_path / "spool", max_bytes=1024)
        written = 0
        try:
            for _ in range(10):
                await log.completion(record("x" * 200))
                written += 1
        except StorageUnavailable as exc:
            code = exc.code
        assert log.spool is not None
        lines = log.spool.depth
        await close_log(log)
        assert lines == written
        return written, code

    written, code = asyncio.run(scenario())
    assert 0 < written < 10 and code == "spool_full"
    lines = list(read_entries(tmp_path / "spool" / "spool-0.jsonl"))
    assert len(lines) == written  # what was refused left nothing behind


def test_without_a_spool_a_write_while_the_database_is_down_is_refused() -> None:
    async def scenario() -> str:
        log = await open_log(down_url(), None)
        try:
            await log.completion(record())
        except StorageUnavailable as exc:
            return exc.code
        finally:
            await close_log(log)
        return "written"

    assert asyncio.run(scenario()) == "database_unavailable"


def test_replays_are_idempotent_and_a_late_vote_never_replaces_a_later_one(
    db: psycopg.Connection[Any],
) -> None:
    answer = record()
    now = datetime.now(UTC)
    ops: list[dict[str, Any]] = [
        {"op": "completion", "row": answer.model_dump(mode="json")},
        {"op": "vote", "completion_id": str(answer.id), "rating": 1, "end_user": "u",
         "key_id": None, "comment": None, "correction": None,
         "at": str(now - timedelta(seconds=30))},
    ]  # fmt: skip

    async def replay(entry: list[dict[str, Any]]) -> None:
        async with await psycopg.AsyncConnection.connect(db.info.dsn) as conn:
            for op in json.loads(json.dumps(entry)):  # as read back from the file
                await apply_op(conn, op)

    async def vote_directly(rating: int) -> None:
        async with await psycopg.AsyncConnection.connect(db.info.dsn) as conn:
            await votes.upsert(conn, completion_id=answer.id, rating=rating, end_user="u", at=now)

    asyncio.run(replay(ops[:1]))
    asyncio.run(vote_directly(-1))  # accepted after the spooled vote
    asyncio.run(replay(ops))  # the spool is replayed late, twice
    asyncio.run(replay(ops))
    assert db.execute("SELECT count(*) FROM completions").fetchone() == (1,)
    assert db.execute("SELECT rating FROM votes").fetchall() == [(-1,)]
