"""Build a snapshot: run the rules in one REPEATABLE READ transaction, write files,
record the snapshot row last. Nothing is left behind when anything fails."""

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import Connection, IsolationLevel
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from feedback.errors import NotEnoughPairs
from feedback.pairs import files, rules
from feedback.pairs.config import PairSettings
from feedback.pairs.snapshots import Snapshot, get

# A preview's rows are written under this id and rolled back.
_PREVIEW_ID = 0


class Counts(BaseModel):
    """What a build found, kept and dropped."""

    votes: int
    comparisons: int
    answers: int
    pairs: dict[str, int]
    splits: dict[str, int]
    kto: dict[str, int]
    dropped_answers: dict[str, int]
    dropped_pairs: dict[str, int]

    @property
    def total_pairs(self) -> int:
        return sum(self.pairs.values())


@contextmanager
def _transaction(conninfo: str) -> Iterator[Connection[dict[str, Any]]]:
    with psycopg.connect(conninfo, row_factory=dict_row) as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ  # one consistent view
        with conn.transaction():
            yield conn


def _run_rules(
    conn: Connection[dict[str, Any]], settings: PairSettings, snapshot_id: int
) -> Counts:
    production = conn.execute(
        "SELECT to_adapter_id AS id FROM promotions ORDER BY id DESC LIMIT 1"
    ).fetchone()
    p = rules.params(settings, production["id"] if production else None)
    rules.answers(conn, p)
    for rule in rules.RULES:
        rule(conn, p)
    rules.merge(conn, p, snapshot_id)
    rules.kto_rows(conn, p, snapshot_id)
    return _counts(conn, snapshot_id)


def _counts(conn: Connection[dict[str, Any]], snapshot_id: int) -> Counts:
    def grouped(sql: str) -> dict[str, int]:
        return {r["k"]: int(r["n"]) for r in conn.execute(sql, {"s": snapshot_id})}

    one = conn.execute(
        "SELECT (SELECT count(*) FROM votes) AS votes,"
        " (SELECT count(*) FROM comparisons WHERE choice IS NOT NULL) AS comparisons,"
        " (SELECT count(*) FROM answers) AS answers,"
        " (SELECT count(*) - count(DISTINCT pair_id) FROM kept) AS duplicate"
    ).fetchone()
    assert one is not None
    dropped_answers = grouped(
        "SELECT coalesce(dropped, 'net_zero') AS k, count(*) AS n FROM answers"
        " WHERE dropped IS NOT NULL OR (net = 0 AND cardinality(vote_ids) > 0) GROUP BY 1"
    )
    dropped_pairs = grouped(
        "SELECT dropped AS k, count(*) AS n FROM candidates WHERE dropped IS NOT NULL GROUP BY 1"
    )
    if one["duplicate"]:
        dropped_pairs["duplicate"] = int(one["duplicate"])
    kto = grouped(
        "SELECT split AS k, count(*) AS n FROM kto_rows WHERE snapshot_id = %(s)s GROUP BY 1"
    )
    kto.update(
        grouped(
            "SELECT CASE WHEN label THEN 'positive' ELSE 'negative' END AS k, count(*) AS n"
            " FROM kto_rows WHERE snapshot_id = %(s)s GROUP BY 1"
        )
    )
    return Counts(
        votes=one["votes"],
        comparisons=one["comparisons"],
        answers=one["answers"],
        pairs=dict.fromkeys(rules.PRIORITY, 0)
        | grouped(
            "SELECT rule AS k, count(*) AS n FROM pairs WHERE snapshot_id = %(s)s GROUP BY 1"
        ),
        splits=dict.fromkeys(files.SPLITS, 0)
        | grouped(
            "SELECT split AS k, count(*) AS n FROM pairs WHERE snapshot_id = %(s)s GROUP BY 1"
        ),
        kto=kto,
        dropped_answers=dropped_answers,
        dropped_pairs=dropped_pairs,
    )


def preview(conninfo: str, settings: PairSettings) -> Counts:
    """What a build would yield now, without writing anything."""
    with psycopg.connect(conninfo, row_factory=dict_row) as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        tx = conn.transaction(force_rollback=True)
        with tx:
            return _run_rules(conn, settings, _PREVIEW_ID)


def build(
    conninfo: str, settings: PairSettings, snapshots_dir: Path, min_pairs: int = 1
) -> Snapshot:
    """Write a new immutable snapshot; raise NotEnoughPairs (and write nothing) below min_pairs."""
    target: Path | None = None
    try:
        with _transaction(conninfo) as conn:
            snapshot_id = int(_scalar(conn, "SELECT nextval('snapshots_id_seq')"))
            counts = _run_rules(conn, settings, snapshot_id)
            if counts.total_pairs < min_pairs:
                raise NotEnoughPairs(counts.total_pairs, min_pairs, counts.model_dump())
            pairs, kto = _rows(conn, snapshot_id)
            target = snapshots_dir / str(snapshot_id)
            hashes = files.write(target, pairs, kto)
            cutoff: datetime = _scalar(conn, "SELECT now()")
            conn.execute(
                "INSERT INTO snapshots (id, cutoff, settings, counts, content_sha256, path, files)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    snapshot_id,
                    cutoff,
                    Jsonb(settings.model_dump()),
                    Jsonb(counts.model_dump()),
                    content_sha256(pairs, kto),
                    str(target),
                    Jsonb(hashes),
                ),
            )
            snapshot = get(conn, snapshot_id)
    except BaseException:
        if target is not None and target.exists():
            shutil.rmtree(target, ignore_errors=True)
        raise
    assert snapshot is not None
    return snapshot


def _scalar(conn: Connection[dict[str, Any]], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return next(iter(row.values()))


def _rows(
    conn: Connection[dict[str, Any]], snapshot_id: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    pairs: dict[str, list[dict[str, Any]]] = {s: [] for s in files.SPLITS}
    for row in conn.execute(
        "SELECT split, id, rule, prompt, chosen, rejected FROM pairs"
        " WHERE snapshot_id = %s ORDER BY split, id",
        (snapshot_id,),
    ):
        pairs[row["split"]].append(row)
    kto: dict[str, list[dict[str, Any]]] = {s: [] for s in files.SPLITS}
    for row in conn.execute(
        "SELECT split, completion_id::text AS id, prompt, completion, label FROM kto_rows"
        " WHERE snapshot_id = %s ORDER BY split, completion_id",
        (snapshot_id,),
    ):
        kto[row["split"]].append(row)
    return pairs, kto


def content_sha256(
    pairs: dict[str, list[dict[str, Any]]], kto: dict[str, list[dict[str, Any]]]
) -> str:
    """Hash of every row's content, in a fixed order; independent of the snapshot id."""
    digest = hashlib.sha256()
    for kind, rows_by_split in (("pairs", pairs), ("kto", kto)):
        for split in files.SPLITS:
            for row in rows_by_split[split]:
                digest.update(kind.encode() + b"\0")
                digest.update(
                    json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()
                )
                digest.update(b"\n")
    return digest.hexdigest()
