"""Who may vote on an answer (or choose in a comparison), and as which voter.

An answer belongs to the key that received it and to the end user it was generated
for (the chat request's `user`; '' when none was named). Only that key, or an ops
key, may vote on it; for any other key it does not exist. The voter is the pair
(key, end user): end users are namespaced by the key that names them, so two keys'
`alice` are two voters.

`per_answer="owner"` (the default): only the answer's own end user votes, so an
answer has at most one live vote and a repeat replaces it. A request that names no
user votes as the owner (the key could name the owner anyway); one that names
another user is refused. `per_answer="any"`: every end user of the answer's key may
vote (shared answers); naming no user still means the owner.

The day cap counts what a voter cast in the last 24 hours: votes on distinct answers
plus choices. Replacing one's own vote on an answer is never blocked by it: it adds
no row and no weight, and a user must be able to change their mind.
"""

import uuid
from dataclasses import dataclass
from typing import Literal

from psycopg import AsyncConnection, errors
from pydantic import BaseModel, ConfigDict

from feedback.errors import NotTheOwner, VoteCapExceeded, VoterBusy

PerAnswer = Literal["owner", "any"]


class Voter(BaseModel):
    model_config = ConfigDict(frozen=True)

    key_id: uuid.UUID | None
    end_user: str


@dataclass(frozen=True)
class Caller:
    """Who sends a vote or choice: a key (or a feedback token issued to one) and the
    end user the request names, if any."""

    key_id: uuid.UUID | None
    ops: bool = False
    user: str | None = None
    # A feedback token acts for the answer's owner only, whatever the setting.
    as_owner: bool = False


@dataclass(frozen=True)
class VoteRules:
    per_answer: PerAnswer = "owner"
    # None: not checked (spool replays of votes the gateway accepted already).
    per_voter_per_day: int | None = None


def owner(key_id: uuid.UUID | None, end_user: str | None) -> Voter:
    return Voter(key_id=key_id, end_user=end_user or "")


def resolve(answer_owner: Voter, caller: Caller, per_answer: PerAnswer) -> Voter | None:
    """The voter this caller votes as; None when the caller may not see the answer at
    all (the route then answers exactly as for an unknown id). NotTheOwner when it
    names an end user who may not vote on it."""
    if not caller.ops and (answer_owner.key_id is None or caller.key_id != answer_owner.key_id):
        return None
    named = caller.user or None  # '' names nobody, like an absent `user`
    if named is None:
        return answer_owner
    if per_answer == "owner" or caller.as_owner:
        if named != answer_owner.end_user:
            raise NotTheOwner(f"only the end user it was generated for votes on it, not {named!r}")
        return answer_owner
    return Voter(key_id=answer_owner.key_id, end_user=named)


async def lock(conn: AsyncConnection, voter: Voter) -> None:
    """Serialize one voter's writes until the transaction ends, so that concurrent
    votes cannot all pass the day cap's count."""
    await conn.execute("SET LOCAL lock_timeout = '1s'")
    try:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"voter:{voter.key_id}:{voter.end_user}",),
        )
    except errors.LockNotAvailable as exc:
        raise VoterBusy("this voter's other votes are being written; retry in a moment") from exc


async def check_day_cap(conn: AsyncConnection, voter: Voter, cap: int) -> None:
    """Raise VoteCapExceeded when the voter cast `cap` votes and choices in the last
    24 hours. Call under `lock`. A voter without a key (ops voting on an answer no
    key received) is not capped."""
    if voter.key_id is None:
        return
    cur = await conn.execute(
        "WITH mine AS ("
        " SELECT created_at AS at FROM votes WHERE key_id = %(k)s AND end_user = %(u)s"
        "  AND created_at > now() - interval '1 day'"
        " UNION ALL"
        " SELECT decided_at FROM comparisons WHERE chooser_key_id = %(k)s AND chooser = %(u)s"
        "  AND decided_at > now() - interval '1 day')"
        " SELECT count(*), extract(epoch FROM min(at) + interval '1 day' - now()) FROM mine",
        {"k": voter.key_id, "u": voter.end_user},
    )
    row = await cur.fetchone()
    assert row is not None
    if row[0] >= cap:
        raise VoteCapExceeded(cap, retry_after=max(1, int(row[1] or 0) + 1))
