"""The promotion gate over HTTP: evaluations, reviews, promotions and rollback."""

from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ratchet import evaluations, promotion, registry
from ratchet import review as reviews
from ratchet.evaluations import Evaluation, EvaluationBusy
from ratchet.jobs import defer_evaluation
from ratchet.keys import ApiKey
from ratchet.promotion import ProductionState, PromotionError
from ratchet.registry import Adapter
from serve.deps import OpsKey, ReviewerKey, RowId, Services, ServicesDep
from serve.errors import APIError, Conflict, GatewayTimeout, NotFound, Unavailable

router = APIRouter(prefix="/v1/admin", tags=["promotion gate"])
T = TypeVar("T")


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1, description="Adapter id, sha256 (prefix) or engine name.")


class PromoteRequest(EvaluateRequest):
    force: bool = Field(default=False, description="Promote without a passed gate (recorded).")
    reason: str = Field(default="", max_length=2000)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000)


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(default=None, max_length=reviews.MAX_NOTE_CHARS)


class EvaluationView(BaseModel):
    """An evaluation as people see it: status, progress, decision; report on request."""

    id: int
    adapter_id: str
    status: str
    stage: str | None
    progress: float
    decision: str | None
    reasons: list[str]
    error: str | None
    review: str | None
    reviewed_by: str | None
    reviewed_at: Any
    report_url: str
    report: dict[str, Any] | None = None


def actor(key: ApiKey) -> str:
    return f"{key.name or key.id} ({key.role})"


@router.post("/evaluations", status_code=202)
async def start_evaluation(
    request: EvaluateRequest, key: OpsKey, services: ServicesDep
) -> EvaluationView:
    """Queue an evaluation of an adapter against current production."""
    async with services.pool.connection() as conn:
        adapter = await _adapter(conn, request.adapter)
    return _view(await queue_evaluation(services, adapter, actor(key)))


async def queue_evaluation(services: Services, adapter: Adapter, requested_by: str) -> Evaluation:
    """Commit the row first, then defer its job: a worker never looks for a row it
    cannot see yet. If the job cannot be deferred, the row goes too."""
    async with services.pool.connection() as conn:
        try:
            evaluation = await evaluations.create(conn, adapter.id, requested_by)
        except EvaluationBusy as exc:
            raise Conflict(str(exc), param="adapter", code="evaluation_in_progress") from exc
    try:
        await defer_evaluation(services.jobs, evaluation.id, adapter.id)
    except Exception as exc:  # no job, no evaluation row
        async with services.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM evaluations WHERE id = %s AND status = 'queued'", (evaluation.id,)
            )
        raise Unavailable(
            "The job queue is unavailable; please retry.", code="queue_unavailable"
        ) from exc
    return evaluation


@router.get("/evaluations")
async def list_evaluations(_: ReviewerKey, services: ServicesDep) -> dict[str, Any]:
    async with services.pool.connection() as conn:
        found = await evaluations.list_recent(conn)
    return {"object": "list", "data": [_view(e) for e in found]}


@router.get("/evaluations/{evaluation_id}")
async def get_evaluation(
    evaluation_id: RowId, _: ReviewerKey, services: ServicesDep
) -> EvaluationView:
    """One evaluation with its full report (JSON) once it has finished."""
    async with services.pool.connection() as conn:
        evaluation = await _evaluation(conn, evaluation_id)
    report = evaluations.report_of(evaluation)
    return _view(evaluation, report.model_dump(mode="json") if report else None)


@router.post("/evaluations/{evaluation_id}/approve")
async def approve(
    evaluation_id: RowId, key: ReviewerKey, services: ServicesDep, body: ReviewRequest | None = None
) -> EvaluationView:
    """Approve a passed report: its adapter is promoted at once."""
    done = await decide(services, evaluation_id, key, "approved", body.note if body else None)
    return _view(done)


@router.post("/evaluations/{evaluation_id}/reject")
async def reject(
    evaluation_id: RowId, key: ReviewerKey, services: ServicesDep, body: ReviewRequest | None = None
) -> EvaluationView:
    done = await decide(services, evaluation_id, key, "rejected", body.note if body else None)
    return _view(done)


@router.get("/promotions")
async def list_promotions(_: ReviewerKey, services: ServicesDep) -> dict[str, Any]:
    """Production's history, newest first: promotions and rollbacks, who and why."""
    async with services.pool.connection() as conn:
        return {"object": "list", "data": await promotion.history(conn)}


@router.post("/promotions", status_code=201)
async def promote(request: PromoteRequest, key: OpsKey, services: ServicesDep) -> ProductionState:
    """Load, smoke-test and switch production to an adapter that passed the gate."""
    async with services.pool.connection() as conn:
        adapter = await _adapter(conn, request.adapter)
    state = await _refusable(
        promotion.promote(
            services.pool.connection,
            services.engines.reachable(),
            adapter,
            actor(key),
            force=request.force,
            reason=request.reason,
            lock_timeout_s=services.settings.promotion_lock_timeout_s,
        )
    )
    services.router.invalidate()
    return state


@router.post("/rollback", status_code=201)
async def rollback(
    key: OpsKey, services: ServicesDep, request: RollbackRequest | None = None
) -> ProductionState:
    """Switch production back to what it was before the current promotion."""
    state = await _refusable(
        promotion.rollback(
            services.pool.connection,
            services.engines.reachable(),
            actor(key),
            request.reason if request else "",
            lock_timeout_s=services.settings.promotion_lock_timeout_s,
        )
    )
    services.router.invalidate()
    return state


async def decide(
    services: Services, evaluation_id: int, key: ApiKey, verdict: Any, note: str | None
) -> Evaluation:
    done = await _refusable(
        reviews.review(
            services.pool.connection,
            services.engines.reachable(),
            evaluation_id,
            actor(key),
            verdict,
            note,
            lock_timeout_s=services.settings.promotion_lock_timeout_s,
        )
    )
    services.router.invalidate()
    return done


async def _refusable(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except PromotionError as exc:
        if exc.status == 503:
            raise Unavailable(exc.message, code=exc.code) from exc
        if exc.status == 504:
            raise GatewayTimeout(exc.message, code=exc.code) from exc
        error = APIError(exc.message, code=exc.code)
        error.status_code = exc.status
        error.type = "invalid_request_error" if exc.status < 500 else "server_error"
        raise error from exc


async def _adapter(conn: Any, ref: str) -> Adapter:
    adapter = await registry.find(conn, ref)
    if adapter is None:
        raise NotFound(
            f"No adapter matches {ref!r}; give its id, sha256 (8+ leading hex digits) or "
            "engine name (GET /v1/admin/adapters lists them).",
            param="adapter",
            code="adapter_not_found",
        )
    return adapter


async def _evaluation(conn: Any, evaluation_id: int) -> Evaluation:
    evaluation = await evaluations.get(conn, evaluation_id)
    if evaluation is None:
        raise NotFound(
            f"No evaluation with id {evaluation_id}.",
            param="evaluation_id",
            code="evaluation_not_found",
        )
    return evaluation


def _view(evaluation: Evaluation, report: dict[str, Any] | None = None) -> EvaluationView:
    return EvaluationView(
        **evaluation.model_dump(exclude={"report", "adapter_id"}),
        adapter_id=str(evaluation.adapter_id),
        report_url=f"/reports/{evaluation.id}",
        report=report,
    )
