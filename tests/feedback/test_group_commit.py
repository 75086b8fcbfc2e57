"""Group commit: concurrent votes share transactions, each gets its own outcome, and one
request's failure does not fail the others it was grouped with."""

import asyncio
import time
import uuid

import psycopg
import pytest

from feedback.errors import VoterBusy
from feedback.log import AnswerLog, VoteReceipt
from feedback.voters import Caller, VoteRules
from feedback.votes import Ballot
from tests.feedback.conftest import empty
from tests.feedback.test_spool import open_log, record
from tests.helpers import query

RULES = VoteRules("any", 500)


def ballot(answer: uuid.UUID, rating: int = 1) -> Ballot:
    return Ballot(completion_id=answer, rating=rating)


async def close(log: AnswerLog) -> None:
    await log.aclose()
    await log.watch.aclose()
    await log.pool.close()


def test_concurrent_votes_share_commits_and_all_are_stored(pairs_url: str) -> None:
    empty(pairs_url)
    answer = record()

    async def run() -> tuple[list[object], int]:
        log = await open_log(pairs_url, None)
        await log.completion(answer)
        votes = [
            log.votes([(ballot(answer.id, 1 if i % 3 else -1), Caller(None, True, f"u{i}"))], RULES)
            for i in range(60)
        ]
        done: list[object] = [r for (r,) in await asyncio.gather(*votes)]
        groups = log._groups.groups
        await close(log)
        return done, groups

    done, groups = asyncio.run(run())
    receipts = [d for d in done if isinstance(d, VoteReceipt)]
    assert [r.voter.end_user for r in receipts] == [f"u{i}" for i in range(60)]
    rows = query(pairs_url, "SELECT end_user, rating FROM votes ORDER BY id")
    assert {(r["end_user"], r["rating"]) for r in rows} == {
        (f"u{i}", 1 if i % 3 else -1) for i in range(60)
    }
    # 60 requests at once, queued before the writer runs: one transaction.
    assert groups == 1


def test_a_busy_voter_fails_only_its_own_request(pairs_url: str) -> None:
    """A voter whose lock another transaction holds makes its group's write fail;
    the group is then written request by request: only that voter's gets VoterBusy."""
    empty(pairs_url)
    answer = record()

    async def run() -> tuple[list[object], float]:
        log = await open_log(pairs_url, None)
        await log.completion(answer)
        async with await psycopg.AsyncConnection.connect(pairs_url) as holder:
            await holder.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('voter:None:busy', 0))"
            )
            first = asyncio.create_task(
                log.votes([(ballot(answer.id), Caller(None, True, "early"))], RULES)
            )
            await asyncio.sleep(0)  # the writer takes `early` alone; the rest queue
            users = ["a", "busy", "b", "c"]
            started = time.monotonic()
            grouped = await asyncio.gather(
                *(log.votes([(ballot(answer.id), Caller(None, True, u))], RULES) for u in users),
                return_exceptions=True,
            )
            waited = time.monotonic() - started
            await holder.rollback()
        await first
        await close(log)
        return [g if isinstance(g, BaseException) else g[0] for g in grouped], waited

    outcomes, waited = asyncio.run(run())
    assert isinstance(outcomes[1], VoterBusy)
    assert [isinstance(o, VoteReceipt) for o in outcomes] == [True, False, True, True]
    stored = {r["end_user"] for r in query(pairs_url, "SELECT end_user FROM votes")}
    assert stored == {"early", "a", "b", "c"}
    assert waited < 10  # two lock timeouts of 1 s, not one per request


@pytest.mark.parametrize("size", [1, 100])
def test_a_request_is_never_split(pairs_url: str, size: int) -> None:
    """A batch's items stay in one transaction: with other requests queued, the group
    holds whole requests only, up to its item limit."""
    empty(pairs_url)
    answers = [record() for _ in range(3)]

    async def run() -> tuple[list[list[object]], int]:
        log = await open_log(pairs_url, None)
        for a in answers:
            await log.completion(a)
        writer = log._batches if size > 1 else log._groups  # batches have their own
        writer.max_items = 150
        requests = [
            [(ballot(answers[j % 3].id), Caller(None, True, f"r{j}-{i}")) for i in range(size)]
            for j in range(6)
        ]
        done = await asyncio.gather(*(log.votes(r, RULES) for r in requests))
        groups = writer.groups
        await close(log)
        return [list(d) for d in done], groups

    done, groups = asyncio.run(run())
    # All six are queued before the writer runs. 100 items: each request alone (two
    # would pass the limit); 1 item: all six in one transaction.
    assert groups == (6 if size == 100 else 1)
    assert [len(d) for d in done] == [size] * 6
    assert all(isinstance(o, VoteReceipt) for d in done for o in d)
    count = query(pairs_url, "SELECT count(*) AS n FROM votes")[0]["n"]
    assert count == 6 * size
