"""The answer log as the gateway writes it: straight to Postgres, or through the spool.

While the database answers, every write is one transaction, as before. When it does
not (connection refused, reset, no pooled connection within the acquire timeout),
the write goes to the durable local spool instead and the client gets its answer
id or 2xx as usual. From then on *every* write goes to the spool, in order, until
a replay has copied all of it into the database and truncated it; replays are
idempotent (ids come from the gateway, inserts skip rows already there, votes keep
the one accepted last), so a crash mid-replay loses and duplicates nothing.

Votes and choices written to the spool cannot be checked against the database, so
they are taken only for answers and comparisons this gateway gave recently (it
remembers their ids and owners, and checks who may vote as whom the same way);
others, including those of another key, get 503 + Retry-After until the database is
back. The voters' day cap is not counted then (it needs the database); the spool
only holds votes for this gateway's recent answers, one live vote per voter each.
"""

import asyncio
import contextlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from feedback import comparisons, completions, voters, votes
from feedback.comparisons import Choice
from feedback.completions import CompletionRecord, CompletionStatus
from feedback.errors import (
    AlreadyDecided,
    FeedbackError,
    NotTheOwner,
    StorageUnavailable,
    UnknownCompletion,
    VoteCapExceeded,
)
from feedback.group_commit import GroupCommit
from feedback.spool import Entry, Spool, SpoolFile, SpoolFull, read_batch
from feedback.voters import Caller, Voter, VoteRules
from feedback.votes import Ballot
from ratchet.db import DatabaseWatch, unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
# Answers and comparisons remembered for votes taken while the database is down.
RECENT = 200_000


@dataclass
class VoteReceipt:
    voter: Voter
    comment: str | None
    correction: str | None
    updated: bool


@dataclass
class _Compared:
    owner: Voter
    choice: Choice | None = None


@dataclass
class LogStats:
    replayed: int = 0
    dead: int = 0
    refused: int = 0


class _NothingSpooled(Exception):
    """No vote of a batch could be spooled; each one's outcome says why."""


def _receipt(cast: votes.Cast) -> VoteReceipt | FeedbackError:
    if cast.error is not None:
        return cast.error
    vote = cast.vote
    assert vote is not None
    voter = voters.owner(vote.key_id, vote.end_user)
    return VoteReceipt(voter, vote.comment, vote.correction, cast.updated)


class _Recent(OrderedDict[uuid.UUID, Any]):
    def remember(self, key: uuid.UUID, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > RECENT:
            self.popitem(last=False)


class AnswerLog:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        watch: DatabaseWatch,
        spool: Spool | None,
        write_timeout: float = 5.0,
    ) -> None:
        self.pool = pool
        self.watch = watch
        self.spool = spool
        # A database that accepts connections and then says nothing (a frozen server)
        # must not hang requests: past this, a write counts as failed and is spooled.
        self.write_timeout = write_timeout
        self.stats = LogStats()
        self.spooling = False
        self._answers = _Recent()  # completion id -> its owner (Voter)
        self._comparisons = _Recent()  # comparison id -> _Compared
        self._replay: asyncio.Task[None] | None = None
        # Single votes: one writer, so that votes arriving meanwhile make one big group
        # (more writers made smaller groups, and more CPU a vote). Batches are groups
        # already: several writers let Postgres work on some while this process
        # parses others (measured in bench/vote_ingest.py).
        self._groups = GroupCommit(self._votes_now)
        self._batches = GroupCommit(self._votes_now, max_items=300, writers=4)

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> None:
        """Claim a spool file; what earlier processes left is replayed when possible."""
        if self.spool is None:
            return
        self.spool.open()
        leftovers = self.spool.orphans()
        if self.spool.depth or leftovers:
            self.spooling = bool(self.spool.depth)
            self._start_replay(leftovers)

    async def flush(self, timeout: float) -> bool:
        """Replay what is spooled now, if the database answers; True when empty."""
        if self.spool is None or not (self.spooling or self.spool.depth):
            return True
        self._start_replay([])
        assert self._replay is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._replay), timeout)
        except TimeoutError:
            return False
        return not self.spooling

    async def aclose(self) -> None:
        await self._groups.aclose()
        await self._batches.aclose()
        if self._replay is not None:
            self._replay.cancel()
            await asyncio.gather(self._replay, return_exceptions=True)
        if self.spool is not None:
            self.spool.close()

    # -- writes --------------------------------------------------------------

    async def completion(self, record: CompletionRecord) -> None:
        await self._write(
            lambda conn: completions.insert(conn, record),
            lambda: [{"op": "completion", "row": record.model_dump(mode="json")}],
            one_statement=True,
        )
        self._answers.remember(record.id, voters.owner(record.key_id, record.end_user))

    async def finish(
        self,
        completion_id: uuid.UUID,
        *,
        status: CompletionStatus,
        output: str,
        finish_reason: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        latency_ms: float,
    ) -> None:
        fields: dict[str, Any] = {
            "status": status,
            "output": output,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_ms": latency_ms,
        }
        op = {"op": "finish", "id": str(completion_id), **fields}
        await self._write(
            lambda conn: completions.finish(conn, completion_id, **fields),
            lambda: [op],
            one_statement=True,
        )

    async def vote(self, ballot: Ballot, caller: Caller, rules: VoteRules) -> VoteReceipt:
        """Record a vote; UnknownCompletion, NotTheOwner, VoteCapExceeded as `votes.cast`."""
        (done,) = await self.votes([(ballot, caller)], rules)
        if isinstance(done, FeedbackError):
            raise done
        return done

    async def votes(
        self, ballots: Sequence[tuple[Ballot, Caller]], rules: VoteRules
    ) -> list[VoteReceipt | FeedbackError]:
        """Record votes, each checked as `vote` checks one: a refused one
        (UnknownCompletion, NotTheOwner, VoteCapExceeded, or while the database is
        down StorageUnavailable) stores nothing and stops no other. VoterBusy, or the
        database and spool both unavailable, refuses them all.

        Group commit: votes that arrive while another group is being written wait
        for it and go together in the next transaction (one commit for many clients);
        a lone vote is written at once."""
        groups = self._groups if len(ballots) == 1 else self._batches
        return await groups.submit(list(ballots), rules)

    async def _votes_now(
        self, ballots: Sequence[tuple[Ballot, Caller]], rules: VoteRules
    ) -> list[VoteReceipt | FeedbackError]:
        """One transaction for all of `ballots` (see `votes`)."""
        at = datetime.now(UTC)

        async def direct(conn: AsyncConnection) -> list[VoteReceipt | FeedbackError]:
            done = await votes.cast_many(conn, ballots, rules, at)
            return [_receipt(cast) for cast in done]

        spooled: list[VoteReceipt | FeedbackError] = []
        try:
            stored = await self._write(
                direct, lambda: self._spool_votes(ballots, rules, at, spooled), pipelined=True
            )
        except UnknownCompletion:
            if len(ballots) == 1:
                raise
            # An answer disappeared between the checks and the write: one at a time.
            return [await self._one(ballot, caller, rules) for ballot, caller in ballots]
        except _NothingSpooled:
            return spooled
        return stored if stored is not None else spooled

    async def _one(
        self, ballot: Ballot, caller: Caller, rules: VoteRules
    ) -> VoteReceipt | FeedbackError:
        try:
            (done,) = await self._votes_now([(ballot, caller)], rules)
            if isinstance(done, FeedbackError):
                raise done
            return done
        except (UnknownCompletion, NotTheOwner, VoteCapExceeded) as exc:
            return exc

    def _spool_votes(
        self,
        ballots: Sequence[tuple[Ballot, Caller]],
        rules: VoteRules,
        at: datetime,
        outcomes: list[VoteReceipt | FeedbackError],
    ) -> Entry:
        """The spool entry of the votes that can be checked without the database
        (on answers this gateway gave recently); `outcomes` gets each one's fate."""
        ops: Entry = []
        for ballot, caller in ballots:
            owner = self._answers.get(ballot.completion_id)
            try:
                voter = voters.resolve(owner, caller, rules.per_answer) if owner else None
            except NotTheOwner as exc:
                outcomes.append(exc)
                continue
            if voter is None:  # unknown here, or another key's: the same answer
                outcomes.append(
                    StorageUnavailable(
                        "The database is unavailable and this answer is not one this "
                        "gateway gave recently, so the vote cannot be checked now; please "
                        "retry.",
                        code="database_unavailable",
                    )
                )
                continue
            outcomes.append(VoteReceipt(voter, ballot.comment, ballot.correction, False))
            fields = {"end_user": voter.end_user, "key_id": voter.key_id, "at": at}
            ops.append({"op": "vote", **ballot.model_dump(), **fields})
        if not ops:
            first = outcomes[0]
            if len(outcomes) == 1 and isinstance(first, FeedbackError):
                raise first
            raise _NothingSpooled
        return ops

    async def comparison(
        self,
        a: CompletionRecord,
        b: CompletionRecord,
        *,
        comparison_id: uuid.UUID,
        key_id: uuid.UUID | None,
        end_user: str | None,
    ) -> None:
        """Both answers and the comparison, together or not at all."""
        fields: dict[str, Any] = {
            "comparison_id": comparison_id,
            "key_id": key_id,
            "end_user": end_user,
            "messages": a.messages,
            "params": a.params,
            "completion_a": a.id,
            "completion_b": b.id,
            "created_at": datetime.now(UTC),
        }

        async def direct(conn: AsyncConnection) -> None:
            await completions.insert(conn, a)
            await completions.insert(conn, b)
            await comparisons.create(conn, **fields)

        ops = [
            {"op": "completion", "row": a.model_dump(mode="json")},
            {"op": "completion", "row": b.model_dump(mode="json")},
            {"op": "comparison", **fields},
        ]
        await self._write(direct, lambda: ops)
        self._answers.remember(a.id, voters.owner(a.key_id, a.end_user))
        self._answers.remember(b.id, voters.owner(b.key_id, b.end_user))
        self._comparisons.remember(comparison_id, _Compared(voters.owner(key_id, end_user)))

    async def choice(
        self, comparison_id: uuid.UUID, choice: Choice, caller: Caller, rules: VoteRules
    ) -> Choice:
        """Record a choice; UnknownComparison, NotTheOwner, AlreadyDecided and
        VoteCapExceeded as `comparisons.choose`."""
        at = datetime.now(UTC)

        async def direct(conn: AsyncConnection) -> Choice:
            decided = await comparisons.choose(conn, comparison_id, choice, caller, rules, at)
            assert decided.choice is not None
            return decided.choice

        def spooled() -> Entry:
            known = self._comparisons.get(comparison_id)
            voter = (
                voters.resolve(known.owner, caller, rules.per_answer) if known is not None else None
            )
            if known is None or voter is None:
                raise StorageUnavailable(
                    "The database is unavailable and this comparison is not one this gateway "
                    "made recently, so the choice cannot be checked now; please retry.",
                    code="database_unavailable",
                )
            if known.choice is not None and known.choice != choice:
                raise AlreadyDecided(str(comparison_id), known.choice)
            op = {
                "op": "choice",
                "id": comparison_id,
                "choice": choice,
                "chooser": voter.end_user,
                "chooser_key_id": voter.key_id,
                "at": at,
            }
            return [op]

        done = await self._write(direct, spooled)
        known = self._comparisons.get(comparison_id)
        if known is not None and known.choice is None:
            known.choice = done or choice
        return done if done is not None else choice

    async def _write(
        self,
        direct: Callable[[AsyncConnection], Awaitable[T]],
        spooled: Callable[[], Entry],
        *,
        one_statement: bool = False,
        pipelined: bool = False,
    ) -> T | None:
        """Write to the database, or to the spool when it is down (None then).
        `spooled` checks what can be checked without the database (raising to refuse)
        and gives the spool entry. `one_statement`: `direct` runs a single statement,
        which is then its own transaction (see `_autocommit`). `pipelined`: the
        transaction runs in pipeline mode, so that BEGIN travels with the first
        statement (a round trip fewer; `direct` must fetch what it needs)."""
        if self.watch.up and not self.spooling:
            try:
                async with asyncio.timeout(self.write_timeout):
                    async with self.pool.connection() as conn:
                        if one_statement:
                            return await _autocommit(conn, direct)
                        if pipelined:
                            async with conn.pipeline(), conn.transaction():
                                return await direct(conn)
                        async with conn.transaction():
                            return await direct(conn)
            except Exception as exc:
                # It may have committed all the same: replays are idempotent.
                if not (unavailable(exc) or isinstance(exc, TimeoutError)):
                    raise
                self.watch.failed(exc)
        entry = spooled()
        if self.spool is None:
            self.stats.refused += 1
            raise StorageUnavailable(
                "The database is unavailable and the spool is disabled; please retry.",
                code="database_unavailable",
            )
        try:
            self.spool.append(entry)
        except SpoolFull as exc:
            self.stats.refused += 1
            raise StorageUnavailable(
                f"The database is unavailable and {exc}; please retry.", code="spool_full"
            ) from exc
        if not self.spooling:
            log.warning("answer log: writing to the spool until the database is back")
        self.spooling = True
        self._start_replay([])
        return None

    # -- replay --------------------------------------------------------------

    def _start_replay(self, leftovers: list[SpoolFile]) -> None:
        if self._replay is None or self._replay.done():
            self._replay = asyncio.get_running_loop().create_task(
                self._replay_when_up(leftovers), name="spool-replay"
            )

    async def _replay_when_up(self, leftovers: list[SpoolFile]) -> None:
        while True:
            if not self.watch.up:
                await self.watch.wait_up()
            try:
                while leftovers:
                    await self._replay_file(leftovers[0])
                    done = leftovers.pop(0)
                    done.path.unlink(missing_ok=True)
                    done.close()
                await self._replay_own()
                return
            except Exception as exc:
                if unavailable(exc) or isinstance(exc, TimeoutError):
                    self.watch.failed(exc)
                else:
                    log.exception("spool replay failed; retrying")
                await asyncio.sleep(self.watch.interval)

    async def _replay_own(self) -> None:
        assert self.spool is not None and self.spool.own is not None
        own, offset = self.spool.own, 0
        while True:
            offset = await self._replay_file(own, offset)
            # Appends are synchronous: between this check and the truncate no write can
            # slip in, and writers go direct again from the next one on.
            if own.size == offset:
                own.truncate()
                self.spooling = False
                break
        log.warning("answer log: spool replayed; writing to the database again")

    async def _replay_file(self, spool_file: SpoolFile, offset: int = 0) -> int:
        """Apply the file's lines from `offset`, a batch at a time; the offset reached."""
        while entries := await asyncio.to_thread(read_batch, spool_file.path, offset):
            for entry, end in entries:
                await self._apply(entry, spool_file)
                offset = end
        return offset

    async def _apply(self, entry: Entry, spool_file: SpoolFile) -> None:
        try:
            async with asyncio.timeout(self.write_timeout):
                async with self.pool.connection() as conn, conn.transaction():
                    for op in entry:
                        await apply_op(conn, op)
        except Exception as exc:
            if unavailable(exc) or isinstance(exc, TimeoutError):
                raise
            # The database refuses it (it never will take it): keep it aside, go on.
            self.stats.dead += 1
            log.error("spooled write refused by the database (%s); kept aside", exc)
            dead = spool_file.path.with_name("dead.jsonl")
            line = json.dumps({"error": str(exc), "entry": entry}, default=str) + "\n"
            await asyncio.to_thread(_append_line, dead, line)
            return
        self.stats.replayed += 1


async def _autocommit(
    conn: AsyncConnection, direct: Callable[[AsyncConnection], Awaitable[T]]
) -> T:
    """Run one statement in autocommit mode: it commits in the round trip that sends
    it, where BEGIN, the statement and COMMIT take three (an answer's id waits on it)."""
    await conn.set_autocommit(True)
    try:
        return await direct(conn)
    finally:
        # Only fails on a connection left mid-query (cancelled), which the pool drops.
        with contextlib.suppress(psycopg.Error):
            await conn.set_autocommit(False)


def _append_line(path: Any, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line)


async def apply_op(conn: AsyncConnection, op: dict[str, Any]) -> None:
    """One spooled operation, written the same way the direct path writes it."""
    kind = op["op"]
    if kind == "completion":
        await completions.insert(conn, CompletionRecord.model_validate(op["row"]))
    elif kind == "finish":
        fields = {k: v for k, v in op.items() if k not in ("op", "id")}
        await completions.finish(conn, uuid.UUID(op["id"]), **fields)
    elif kind == "vote":
        await votes.upsert(
            conn,
            completion_id=uuid.UUID(op["completion_id"]),
            rating=int(op["rating"]),
            end_user=op["end_user"],
            key_id=uuid.UUID(op["key_id"]) if op.get("key_id") else None,
            comment=op.get("comment"),
            correction=op.get("correction"),
            at=datetime.fromisoformat(op["at"]),
        )
    elif kind == "comparison":
        await comparisons.create(
            conn,
            comparison_id=uuid.UUID(op["comparison_id"]),
            key_id=uuid.UUID(op["key_id"]) if op.get("key_id") else None,
            end_user=op.get("end_user"),
            messages=op["messages"],
            params=op["params"],
            completion_a=uuid.UUID(op["completion_a"]),
            completion_b=uuid.UUID(op["completion_b"]),
            created_at=datetime.fromisoformat(op["created_at"]),
        )
    elif kind == "choice":
        try:
            at = datetime.fromisoformat(op["at"])
            chooser_key = uuid.UUID(op["chooser_key_id"]) if op.get("chooser_key_id") else None
            await comparisons.decide(
                conn, uuid.UUID(op["id"]), op["choice"], op["chooser"], at, chooser_key
            )
        except AlreadyDecided:
            # Another gateway recorded a different choice first; the first one stands.
            log.warning("spooled choice on %s lost to an earlier one", op["id"])
    else:
        raise ValueError(f"unknown spool operation {kind!r}")
