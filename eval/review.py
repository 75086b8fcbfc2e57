"""A reviewer's decision on a report: approve (which promotes) or reject.

The check, the promotion and the recorded decision share one transaction: an
approval whose promotion fails leaves the report undecided, and a report can be
decided once.
"""

from collections.abc import Sequence
from typing import Literal

from psycopg import AsyncConnection

from eval import store
from ratchet import promotion, registry
from ratchet.promotion import PromotionError
from serve.engine import EngineClient


async def review(
    conn: AsyncConnection,
    engines: Sequence[EngineClient],
    evaluation_id: int,
    actor: str,
    verdict: Literal["approved", "rejected"],
    note: str | None = None,
) -> store.Evaluation:
    async with conn.transaction():
        evaluation = await store.get(conn, evaluation_id, lock=True)
        if evaluation is None:
            raise PromotionError(
                f"No evaluation with id {evaluation_id}.", 404, "evaluation_not_found"
            )
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
        adapter = await registry.get_by_id(conn, evaluation.adapter_id)
        assert adapter is not None
        if verdict == "approved":
            if evaluation.decision != "pass":
                raise PromotionError(
                    f"Report {evaluation_id} failed the gate; it cannot be approved. Ops can "
                    "still promote with force=true.",
                    409,
                    "gate_failed",
                )
            await promotion.promote(
                conn,
                engines,
                adapter,
                actor,
                evaluation_id=evaluation_id,
                reason=note or f"approved report {evaluation_id}",
            )
        else:
            await registry.set_status(conn, adapter.id, "rejected")
        await store.set_review(conn, evaluation_id, verdict, actor, note)
        await promotion.audit(
            conn,
            actor,
            f"review_{verdict}",
            adapter.sha256,
            {"evaluation_id": evaluation_id, "note": note},
        )
    done = await store.get(conn, evaluation_id)
    assert done is not None
    return done
