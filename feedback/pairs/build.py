"""Build a snapshot: run the rules in one REPEATABLE READ transaction, write files,
record the snapshot row last. Nothing is left behind when anything fails."""

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg import Connection, IsolationLevel
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from feedback.errors import NotEnoughPairs
from feedback.pairs import files, rules
from feedback.pairs.snapshots import Snapshot, get
from ratchet.config import PairSettings

log = logging.getLogger(__name__)

# A preview's rows are written under this id and rolled back.
_PREVIEW_ID = 0

# For the build's own transaction. The server's default work_mem (4 MB) sends every
# sort, hash and aggregate of a large build to disk; temporary tables live in
# temp_buffers (8 MB by default), which must be raised before the first one is made;
# and the planner's row estimates for the rules' joins are far too high, which turns
# on JIT compilation that costs seconds and saves nothing here.
_TUNING = (
    "SET LOCAL work_mem = '256MB'",
    "SET LOCAL temp_buffers = '512MB'",
    "SET LOCAL jit = off",
)


class Timings(dict[str, float]):
    """Seconds per stage of one build, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - started
            log.info("pair build %s: %.2f s", name, self[name])


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
            _tune(conn)
            yield conn


def _tune(conn: Connection[dict[str, Any]]) -> None:
    for statement in _TUNING:
        conn.execute(statement)


def _run_rules(
    conn: Connection[dict[str, Any]],
    settings: PairSettings,
    snapshot_id: int,
    timings: Timings | None = None,
) -> Counts:
    timings = Timings() if timings is None else timings
    production = conn.execute(
        "SELECT to_adapter_id AS id FROM promotions ORDER BY id DESC LIMIT 1"
    ).fetchone()
    p = rules.params(settings, production["id"] if production else None)
    steps: list[tuple[str, Callable[[], None]]] = [("answers", lambda: rules.answers(conn, p))]
    steps += [(rule.__name__, partial(rule, conn, p)) for rule in rules.RULES]
    steps += [("voter_cap", lambda: rules.voter_cap(conn, p))]
    steps += [
        ("merge", lambda: rules.merge(conn, p, snapshot_id)),
        ("kto_rows", lambda: rules.kto_rows(conn, p, snapshot_id)),
    ]
    for name, step in steps:
        with timings.stage(name):
            step()
    with timings.stage("counts"):
        return _counts(conn, snapshot_id)


def _counts(conn: Connection[dict[str, Any]], snapshot_id: int) -> Counts:
    def grouped(sql: str) -> dict[str, int]:
        return {r["k"]: int(r["n"]) for r in conn.execute(sql, {"s": snapshot_id})}

    one = conn.execute(
        "SELECT (SELECT count(*) FROM votes) AS votes,"
        " (SELECT count(*) FROM comparisons WHERE choice IS NOT NULL) AS comparisons,"
        " (SELECT count(*) FROM answers) AS answers,"
        " (SELECT count(*) - count(DISTINCT pair_id) FROM kept) AS duplicate,"
        " (SELECT count(*) FROM candidates WHERE dropped IS NULL AND ch = rh) AS identical"
    ).fetchone()
    assert one is not None
    dropped_answers = grouped(
        "SELECT coalesce(dropped, 'net_zero') AS k, count(*) AS n FROM answers"
        " WHERE dropped IS NOT NULL OR (net = 0 AND votes > 0) GROUP BY 1"
    )
    dropped_pairs = grouped(
        "SELECT k, sum(n) AS n FROM ("
        " SELECT dropped AS k, count(*) AS n FROM candidates WHERE dropped IS NOT NULL GROUP BY 1"
        " UNION ALL SELECT reason, n FROM set_aside) d GROUP BY 1"
    )
    for reason in ("duplicate", "identical"):
        if one[reason]:
            dropped_pairs[reason] = dropped_pairs.get(reason, 0) + int(one[reason])
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
            _tune(conn)
            return _run_rules(conn, settings, _PREVIEW_ID)


def build(
    conninfo: str,
    settings: PairSettings,
    snapshots_dir: Path,
    min_pairs: int = 1,
    timings: Timings | None = None,
) -> Snapshot:
    """Write a new immutable snapshot; raise NotEnoughPairs (and write nothing) below min_pairs.

    `timings`, when given, receives each stage's seconds."""
    timings = Timings() if timings is None else timings
    target: Path | None = None
    try:
        started = time.perf_counter()
        with _transaction(conninfo) as conn:
            timings["connect"] = time.perf_counter() - started
            snapshot_id = int(_scalar(conn, "SELECT nextval('snapshots_id_seq')"))
            counts = _run_rules(conn, settings, snapshot_id, timings)
            if counts.total_pairs < min_pairs:
                raise NotEnoughPairs(counts.total_pairs, min_pairs, counts.model_dump())
            with timings.stage("read_rows"):
                pairs, kto = _rows(conn, snapshot_id)
            target = snapshots_dir / str(snapshot_id)
            with timings.stage("parquet"):
                hashes = files.write(target, pairs, kto)
            with timings.stage("content_hash"):
                content = content_sha256(pairs, kto)
            cutoff: datetime = _scalar(conn, "SELECT now()")
            conn.execute(
                "INSERT INTO snapshots (id, cutoff, settings, counts, content_sha256, path, files)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    snapshot_id,
                    cutoff,
                    Jsonb(settings.model_dump()),
                    Jsonb(counts.model_dump()),
                    content,
                    str(target),
                    Jsonb(hashes),
                ),
            )
            snapshot = get(conn, snapshot_id)
            started = time.perf_counter()
        timings["commit"] = time.perf_counter() - started
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
    """The snapshot's rows by split, in a fixed order; each prompt parsed once."""
    prompts: dict[str, Any] = {}
    for table in ("pairs", "kto_rows"):
        for row in conn.execute(
            f"SELECT DISTINCT ON (prompt_sha256) prompt_sha256, prompt::text AS prompt FROM {table}"
            " WHERE snapshot_id = %s ORDER BY prompt_sha256, prompt::text",
            (snapshot_id,),
        ):
            prompts.setdefault(row["prompt_sha256"], json.loads(row["prompt"]))
    queries = {
        "pairs": "SELECT split, id, rule, prompt_sha256, chosen, rejected FROM pairs"
        " WHERE snapshot_id = %s ORDER BY split, id",
        "kto": "SELECT split, completion_id::text AS id, prompt_sha256, completion, label"
        " FROM kto_rows WHERE snapshot_id = %s ORDER BY split, completion_id",
    }
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind, query in queries.items():
        by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in files.SPLITS}
        for row in conn.execute(query, (snapshot_id,)):
            row["prompt"] = prompts[row["prompt_sha256"]]
            by_split[row["split"]].append(row)
        found[kind] = by_split
    return found["pairs"], found["kto"]


_HASHED = {
    "pairs": ("id", "rule", "prompt_sha256", "chosen", "rejected"),
    "kto": ("id", "prompt_sha256", "completion", "label"),
}


def content_sha256(
    pairs: dict[str, list[dict[str, Any]]], kto: dict[str, list[dict[str, Any]]]
) -> str:
    """Hash of every row's content, in a fixed order; independent of the snapshot id.

    A prompt enters through its hash, which is a hash of its canonical content."""
    digest = hashlib.sha256()
    for kind, rows_by_split in (("pairs", pairs), ("kto", kto)):
        for split in files.SPLITS:
            for row in rows_by_split[split]:
                fields = (kind, split, *(str(row[k]) for k in _HASHED[kind]))
                digest.update("\0".join(fields).encode() + b"\n")
    return digest.hexdigest()
