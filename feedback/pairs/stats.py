"""What has come in since the last snapshot, what a build would make of it, and who
cast the most of it (so that one loud voter is seen before the builder caps it)."""

import uuid
from datetime import datetime
from typing import Any

import psycopg
from pydantic import BaseModel

from feedback.pairs.build import Counts, preview
from ratchet.config import PairSettings


class VoterShare(BaseModel):
    """One voter (key, end user): votes and choices cast, and their share of all."""

    key_id: uuid.UUID | None
    key_name: str
    end_user: str
    votes: int
    share: float

    @property
    def label(self) -> str:
        key = self.key_name or (str(self.key_id)[:8] if self.key_id else "(no key)")
        return f"{key} / {self.end_user or '(no user)'}"


class DatasetStats(BaseModel):
    last_snapshot_id: int | None
    last_cutoff: datetime | None
    new_votes: int
    new_choices: int
    would_yield: Counts
    top_voters: list[VoterShare]

    def top_drops(self, n: int = 5) -> list[tuple[str, str, int]]:
        """(reason, unit, count), most frequent first."""
        rows = [(r, "answers", c) for r, c in self.would_yield.dropped_answers.items()]
        rows += [(r, "pairs", c) for r, c in self.would_yield.dropped_pairs.items()]
        return sorted(rows, key=lambda r: (-r[2], r[0]))[:n]


def stats(conninfo: str, settings: PairSettings) -> DatasetStats:
    with psycopg.connect(conninfo) as conn:
        last: Any = conn.execute(
            "SELECT id, cutoff FROM snapshots ORDER BY id DESC LIMIT 1"
        ).fetchone() or (None, None)
        since = last[1] or datetime.min.replace(year=1970)
        new: Any = conn.execute(
            "SELECT (SELECT count(*) FROM votes WHERE updated_at > %(t)s),"
            " (SELECT count(*) FROM comparisons WHERE decided_at > %(t)s)",
            {"t": since},
        ).fetchone()
        voters = top_voters(conn)
    return DatasetStats(
        last_snapshot_id=last[0],
        last_cutoff=last[1],
        new_votes=new[0],
        new_choices=new[1],
        would_yield=preview(conninfo, settings),
        top_voters=voters,
    )


def top_voters(conn: psycopg.Connection[Any], n: int = 10) -> list[VoterShare]:
    """The voters with the most live votes plus choices, over everything a build reads."""
    rows = conn.execute(
        "WITH cast_by AS ("
        " SELECT key_id, end_user FROM votes"
        " UNION ALL SELECT chooser_key_id, coalesce(chooser, '') FROM comparisons"
        "  WHERE choice IS NOT NULL)"
        " SELECT c.key_id, coalesce(k.name, '') AS key_name, c.end_user, count(*) AS votes,"
        "  count(*)::float8 / sum(count(*)) OVER () AS share"
        " FROM cast_by c LEFT JOIN api_keys k ON k.id = c.key_id"
        " GROUP BY c.key_id, k.name, c.end_user"
        " ORDER BY votes DESC, c.key_id, c.end_user LIMIT %s",
        (n,),
    ).fetchall()
    fields = ("key_id", "key_name", "end_user", "votes", "share")
    return [VoterShare(**dict(zip(fields, row, strict=True))) for row in rows]
