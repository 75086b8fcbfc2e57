"""The `evaluations` and `eval_items` tables."""

import json
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import class_row
from pydantic import BaseModel

from ratchet.errors import Busy
from ratchet.report import Report, Review

Status = Literal["queued", "running", "succeeded", "failed"]
_COLUMNS = (
    "id, adapter_id, production_id, status, stage, progress, decision, reasons, report, error,"
    " review, reviewed_by, reviewed_at, review_note, requested_by, created_at, started_at,"
    " finished_at"
)


class Evaluation(BaseModel):
    id: int
    adapter_id: uuid.UUID
    production_id: uuid.UUID | None
    status: Status
    stage: str | None
    progress: float
    decision: Literal["pass", "fail"] | None
    reasons: list[str]
    report: dict[str, Any] | None
    error: str | None
    review: Literal["approved", "rejected"] | None
    reviewed_by: str | None
    reviewed_at: datetime | None
    review_note: str | None
    requested_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationBusy(Busy):
    """This adapter already has an evaluation queued or running."""

    def __init__(self, evaluation_id: int) -> None:
        super().__init__(f"evaluation {evaluation_id} of this adapter is already queued or running")
        self.evaluation_id = evaluation_id


async def create(conn: AsyncConnection, adapter_id: uuid.UUID, requested_by: str) -> Evaluation:
    try:
        async with conn.transaction(), conn.cursor(row_factory=class_row(Evaluation)) as cur:
            await cur.execute(
                "INSERT INTO evaluations (adapter_id, status, requested_by)"
                f" VALUES (%s, 'queued', %s) RETURNING {_COLUMNS}",
                (adapter_id, requested_by),
            )
            row = await cur.fetchone()
    except psycopg.errors.UniqueViolation as exc:
        active = await active_for(conn, adapter_id)
        raise EvaluationBusy(active.id if active else -1) from exc
    assert row is not None
    return row


async def get(conn: AsyncConnection, evaluation_id: int, lock: bool = False) -> Evaluation | None:
    async with conn.cursor(row_factory=class_row(Evaluation)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM evaluations WHERE id = %s" + (" FOR UPDATE" if lock else ""),
            (evaluation_id,),
        )
        return await cur.fetchone()


async def active_for(conn: AsyncConnection, adapter_id: uuid.UUID) -> Evaluation | None:
    async with conn.cursor(row_factory=class_row(Evaluation)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM evaluations WHERE adapter_id = %s"
            " AND status IN ('queued', 'running') ORDER BY id DESC LIMIT 1",
            (adapter_id,),
        )
        return await cur.fetchone()


async def list_recent(conn: AsyncConnection, limit: int = 50) -> list[Evaluation]:
    async with conn.cursor(row_factory=class_row(Evaluation)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM evaluations ORDER BY id DESC LIMIT %s", (limit,))
        return await cur.fetchall()


async def start(conn: AsyncConnection, evaluation_id: int, production_id: uuid.UUID | None) -> bool:
    """Claim a queued evaluation, recording which production it is compared with;
    False when it is not queued (another worker claimed it)."""
    cur = await conn.execute(
        "UPDATE evaluations SET status = 'running', started_at = now(), heartbeat_at = now(),"
        " production_id = %s, stage = 'starting' WHERE id = %s AND status = 'queued'",
        (production_id, evaluation_id),
    )
    return cur.rowcount == 1


async def progress(conn: AsyncConnection, evaluation_id: int, stage: str, fraction: float) -> None:
    await conn.execute(
        "UPDATE evaluations SET stage = %s, progress = %s, heartbeat_at = now() WHERE id = %s",
        (stage, round(min(max(fraction, 0.0), 1.0), 4), evaluation_id),
    )


async def finish(
    conn: AsyncConnection,
    evaluation_id: int,
    report: Report,
    items: Iterable[tuple[str, str, Any, Any]],
) -> None:
    """Store the report and the per-item evidence together, or neither."""
    async with conn.transaction():
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO eval_items (evaluation_id, suite, item, production, candidate)"
                " VALUES (%s, %s, %s, %s, %s)",
                [
                    (evaluation_id, suite, item, json.dumps(prod), json.dumps(cand))
                    for suite, item, prod, cand in items
                ],
            )
        await conn.execute(
            "UPDATE evaluations SET status = 'succeeded', stage = 'done', progress = 1,"
            " decision = %s, reasons = %s, report = %s, finished_at = now() WHERE id = %s",
            (
                report.decision.decision,
                json.dumps(report.decision.reasons),
                report.model_dump_json(),
                evaluation_id,
            ),
        )


async def fail(conn: AsyncConnection, evaluation_id: int, error: str) -> None:
    await conn.execute(
        "UPDATE evaluations SET status = 'failed', error = %s, finished_at = now() WHERE id = %s",
        (error, evaluation_id),
    )


async def set_review(
    conn: AsyncConnection,
    evaluation_id: int,
    review: Literal["approved", "rejected"],
    actor: str,
    note: str | None,
) -> None:
    await conn.execute(
        "UPDATE evaluations SET review = %s, reviewed_by = %s, reviewed_at = now(),"
        " review_note = %s WHERE id = %s",
        (review, actor, note, evaluation_id),
    )


def report_of(evaluation: Evaluation) -> Report | None:
    """The stored report, with the review as it stands now."""
    if evaluation.report is None:
        return None
    report = Report.model_validate(evaluation.report)
    if evaluation.review is not None:
        report.review = Review(
            status=evaluation.review,
            by=evaluation.reviewed_by,
            at=evaluation.reviewed_at,
            note=evaluation.review_note,
        )
    return report


async def beat(conn: AsyncConnection, evaluation_id: int) -> None:
    await conn.execute(
        "UPDATE evaluations SET heartbeat_at = now() WHERE id = %s", (evaluation_id,)
    )


def recover_abandoned(conninfo: str, stale_after_s: float) -> list[int]:
    """Fail evaluations whose worker died (silent for `stale_after_s`), so that their
    adapters can be evaluated again; returns their ids."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "UPDATE evaluations SET status = 'failed', finished_at = now(), error ="
            " 'abandoned: its worker stopped before it finished' WHERE status = 'running'"
            " AND heartbeat_at < now() - make_interval(secs => %s) RETURNING id, adapter_id",
            (stale_after_s,),
        ).fetchall()
        for _, adapter_id in rows:
            conn.execute(
                "UPDATE adapters SET status = 'candidate' WHERE id = %s AND status = 'evaluating'",
                (adapter_id,),
            )
    return [int(r[0]) for r in rows]
