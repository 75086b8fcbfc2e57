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

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

from psycopg import AsyncConnection, errors

from feedback.errors import NotTheOwner, VoteCapExceeded, VoterBusy

PerAnswer = Literal["owner", "any"]


@dataclass(frozen=True, slots=True)
class Voter:
    """(key, end user). A plain dataclass: it is made and hashed several times for
    every vote (a frozen pydantic model cost 4% of the gateway's time on single votes)."""

    key_id: uuid.UUID | None
    end_user: str
    # Computed once: a batch hashes each voter many times (dict and set keys), and
    # the generated hash would build a tuple and hash the UUID in Python every time.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.key_id, self.end_user)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def key_text(self) -> str | None:
        return key_text(self.key_id)


_KEY_TEXTS: dict[int, str] = {}


def key_text(key_id: uuid.UUID | None) -> str | None:
    """str(key_id), remembered: a batch writes the same few keys' ids hundreds of
    times, and UUID.__str__ is Python code."""
    if key_id is None:
        return None
    text = _KEY_TEXTS.get(key_id.int)
    if text is None:
        if len(_KEY_TEXTS) > 10_000:  # keys are few; never grow without bound
            _KEY_TEXTS.clear()
        text = _KEY_TEXTS[key_id.int] = str(key_id)
    return text


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


async def lock(conn: AsyncConnection, *who: Voter) -> None:
    """Serialize these voters' writes until the transaction ends, so that concurrent
    votes cannot all pass the day cap's count. Locks are taken in one order (by their
    hash), so two batches that share voters cannot deadlock."""
    try:
        async with conn.pipeline():
            await conn.execute("SET LOCAL lock_timeout = '1s'")
            await conn.execute(
                "SELECT count(pg_advisory_xact_lock(h)) FROM (SELECT DISTINCT"
                " hashtextextended(v, 0) AS h FROM unnest(%s::text[]) AS v ORDER BY h) AS s",
                ([f"voter:{v.key_id}:{v.end_user}" for v in who],),
            )
    except errors.LockNotAvailable as exc:
        raise VoterBusy("this voter's other votes are being written; retry in a moment") from exc


# What each voter (key, end user) cast in the last 24 hours, and seconds until the
# oldest of it leaves the window. Voters without a key are not capped: not counted.
# Per voter, one aggregate over its index range (LATERAL): a join of all voters'
# rows, then a sort and a group, cost a batch several times more.
DAY_COUNTS = (
    "WITH who AS (SELECT * FROM jsonb_to_recordset(%(who)s::jsonb) AS w(k uuid, u text)"
    "  WHERE k IS NOT NULL)"
    " SELECT w.k, w.u, m.n, extract(epoch FROM m.first + interval '1 day' - now())"
    " FROM who w, LATERAL (SELECT count(*) AS n, min(at) AS first FROM ("
    "  SELECT v.created_at AS at FROM votes v WHERE v.key_id = w.k AND v.end_user = w.u"
    "   AND v.created_at > now() - interval '1 day'"
    "  UNION ALL"
    "  SELECT c.decided_at FROM comparisons c WHERE c.chooser_key_id = w.k"
    "   AND c.chooser = w.u AND c.decided_at > now() - interval '1 day') AS mine) AS m"
    " WHERE m.n > 0"
)


def day_count_params(who: list[Voter]) -> dict[str, str]:
    # One JSON parameter: psycopg dumps each element of a list parameter in Python.
    rows = [{"k": v.key_text, "u": v.end_user} for v in who]
    return {"who": json.dumps(rows)}


async def check_day_cap(conn: AsyncConnection, voter: Voter, cap: int) -> None:
    """Raise VoteCapExceeded when the voter cast `cap` votes and choices in the last
    24 hours. Call under `lock`. A voter without a key (ops voting on an answer no
    key received) is not capped."""
    cur = await conn.execute(DAY_COUNTS, day_count_params([voter]))
    row = await cur.fetchone()
    if row is not None and row[2] >= cap:
        raise VoteCapExceeded(cap, retry_after=max(1, int(row[3] or 0) + 1))
