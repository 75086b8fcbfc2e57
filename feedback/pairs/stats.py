"""What has come in since the last snapshot, and what a build would make of it."""

from datetime import datetime
from typing import Any

import psycopg
from pydantic import BaseModel

from feedback.pairs.build import Counts, preview
from ratchet.config import PairSettings


class DatasetStats(BaseModel):
    last_snapshot_id: int | None
    last_cutoff: datetime | None
    new_votes: int
    new_choices: int
    would_yield: Counts

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
    return DatasetStats(
        last_snapshot_id=last[0],
        last_cutoff=last[1],
        new_votes=new[0],
        new_choices=new[1],
        would_yield=preview(conninfo, settings),
    )
