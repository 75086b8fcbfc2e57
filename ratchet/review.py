"""A reviewer's decision on a report: approve (which promotes) or reject.

An approval takes the promotion's path: the engine work first, with no lock held;
then one short transaction that locks the report, checks again that it is still
undecided and still current, switches production and records the decision. An
approval whose promotion fails leaves the report undecided, and a report is decided
once.
"""

from collections.abc import Sequence
from typing import Literal

import psycopg
from psycopg import AsyncConnection

from ratchet import evaluations, promotion, registry
from ratchet.engine import EngineClient
from ratchet.promotion import Connect, PromotionError

Verdict = Literal["approved", "rejected"]
# The longest note a reviewer may leave, through the API or the report page's form.
MAX_NOTE_CHARS = 2000


async def review(
    connect: Connect,
    engines: Sequence[EngineClient],
    evaluation_id: int,
    actor: str,
    verdict: Verdict,
    note: str | None = None,
    lock_timeout_s: float = 5.0,
) -> evaluations.Evaluation:
    async with connect() as conn, conn.transaction():
        evaluation = await _reviewable(conn, evaluation_id)
        adapter = await registry.get_by_id(conn, evaluation.adapter_id)
    assert adapter is not None

    async def record(conn: AsyncConnection) -> None:
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
        try:
            await _reviewable(conn, evaluation_id, lock=True)  # nobody decided meanwhile
        except psycopg.errors.LockNotAvailable as exc:
            raise PromotionError(
                f"Report {evaluation_id} is being decided by someone else right now.",
                409,
                "review_busy",
            ) from exc
        if verdict == "rejected":
            current = await promotion.latest(conn)
            if current is not None and current.adapter and current.adapter.id == adapter.id:
                raise PromotionError(
                    f"adapter {adapter.sha256} is production now; roll back instead "
                    "(POST /v1/admin/rollback)",
                    409,
                    "already_production",
                )
            await registry.set_status(conn, adapter.id, "rejected")
        await evaluations.set_review(conn, evaluation_id, verdict, actor, note)
        await promotion.audit(
            conn,
            actor,
            f"review_{verdict}",
            adapter.sha256,
            {"evaluation_id": evaluation_id, "note": note},
        )

    if verdict == "approved":
        if evaluation.decision != "pass":
            raise PromotionError(
                f"Report {evaluation_id} failed the gate; it cannot be approved. Ops can "
                "still promote with force=true.",
                409,
                "gate_failed",
            )
        await promotion.promote(
            connect,
            engines,
            adapter,
            actor,
            evaluation_id=evaluation_id,
            reason=note or f"approved report {evaluation_id}",
            lock_timeout_s=lock_timeout_s,
            also=record,
        )
    else:
        async with connect() as conn, conn.transaction():
            await record(conn)
    async with connect() as conn:
        done = await evaluations.get(conn, evaluation_id)
    assert done is not None
    return done


async def _reviewable(
    conn: AsyncConnection, evaluation_id: int, lock: bool = False
) -> evaluations.Evaluation:
    evaluation = await evaluations.get(conn, evaluation_id, lock=lock)
    if evaluation is None:
        raise PromotionError(f"No evaluation with id {evaluation_id}.", 404, "evaluation_not_found")
    if evaluation.review is not None:
        raise PromotionError(
            f"Report {evaluation_id} was already {evaluation.review} by "
            f"{evaluation.reviewed_by} at {evaluation.reviewed_at:%Y-%m-%d %H:%M:%S %Z}.",
            409,
            "already_reviewed",
        )
    if evaluation.status != "succeeded":
        raise PromotionError(
            f"Evaluation {evaluation_id} is {evaluation.status}; only a finished report "
            "can be reviewed.",
            409,
            "evaluation_not_finished",
        )
    return evaluation
