"""Reading snapshots: their rows in Postgres and their verified files."""

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import Connection
from psycopg.rows import class_row
from pydantic import BaseModel

from feedback.errors import UnknownSnapshot
from feedback.pairs import files

if TYPE_CHECKING:
    from datasets import DatasetDict

_COLUMNS = "id, created_at, cutoff, settings, counts, content_sha256, path, files"


class Snapshot(BaseModel):
    id: int
    created_at: datetime
    cutoff: datetime
    settings: dict[str, Any]
    counts: dict[str, Any]
    content_sha256: str
    path: str
    files: dict[str, str]

    def load(self, kind: str = "pairs") -> "DatasetDict":
        """Train/test datasets of `pairs` or `kto`; raises SnapshotCorrupted if altered."""
        return files.load(Path(self.path), self.files, kind)


def get(conn: Connection[Any], snapshot_id: int) -> Snapshot | None:
    with conn.cursor(row_factory=class_row(Snapshot)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM snapshots WHERE id = %s", (snapshot_id,)
        ).fetchone()


def require(conn: Connection[Any], snapshot_id: int) -> Snapshot:
    snapshot = get(conn, snapshot_id)
    if snapshot is None:
        raise UnknownSnapshot(f"no snapshot with id {snapshot_id}")
    return snapshot


def list_all(conn: Connection[Any], limit: int = 100) -> list[Snapshot]:
    with conn.cursor(row_factory=class_row(Snapshot)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM snapshots ORDER BY id DESC LIMIT %s", (limit,)
        ).fetchall()


def latest_cutoff(conn: Connection[Any]) -> datetime | None:
    row = conn.execute("SELECT max(cutoff) FROM snapshots").fetchone()
    return row[0] if row else None
