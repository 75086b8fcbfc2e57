"""Ops start, watch and cancel trainings: `/v1/admin/retrain`, `/v1/admin/runs`."""

import asyncio
from datetime import UTC, datetime
from typing import Any

import psycopg
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feedback.pairs import snapshots
from feedback.pairs.build import preview
from ratchet import runs
from ratchet.config import TrainConfig
from ratchet.jobs import defer_training
from ratchet.runs import Run, TrainingBusy
from serve.deps import OpsKey, RowId, Services, ServicesDep
from serve.errors import Conflict, InvalidRequest, NotFound, Unavailable

router = APIRouter(prefix="/v1/admin", tags=["training"])


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: str | None = None
    epochs: float | None = None
    learning_rate: float | None = None
    min_pairs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    snapshot_id: int | None = Field(
        default=None, ge=1, le=2**63 - 1, description="Train on this snapshot."
    )


class RunView(Run):
    """A run as ops see it: with progress, ETA and its latest metrics."""

    progress: float | None = None
    eta_s: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class Busy(Conflict):
    """Another training is queued or running; Location points at it."""

    def __init__(self, run_id: int) -> None:
        super().__init__(
            f"Run {run_id} is already queued or running; one training at a time.",
            code="training_busy",
        )
        self.run_id = run_id

    def headers(self) -> dict[str, str]:
        return {"Location": f"/v1/admin/runs/{self.run_id}"}


@router.post("/retrain", status_code=202)
async def retrain(request: RetrainRequest, _: OpsKey, services: ServicesDep) -> RunView:
    """Queue a training run with optional overrides; 409 with the active run if busy."""
    overrides = request.model_dump(exclude_none=True, exclude={"snapshot_id"})
    try:
        config = TrainConfig(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{param}: {first['msg']}", param=param, code="invalid_value") from exc
    await asyncio.to_thread(_check_pairs, services.conninfo, services, config, request.snapshot_id)
    params = {"trigger": "api", "config": config.model_dump(), "snapshot_id": request.snapshot_id}
    try:
        run = await asyncio.to_thread(runs.enqueue, services.conninfo, params)
    except TrainingBusy as exc:
        raise Busy(exc.run_id) from exc
    try:
        job_id = await defer_training(services.jobs, run.id)
    except Exception as exc:  # no job, no run: leave nothing behind
        await asyncio.to_thread(runs.delete_queued, services.conninfo, run.id)
        raise Unavailable(f"the job queue is unavailable: {exc}", code="queue_unavailable") from exc
    await asyncio.to_thread(runs.set_param, services.conninfo, run.id, "job_id", job_id)
    return await _view(services, run.id)


@router.get("/runs")
async def list_runs(_: OpsKey, services: ServicesDep) -> dict[str, Any]:
    """Runs, newest first: status, progress, error."""
    found = await asyncio.to_thread(runs.list_runs, services.conninfo)
    return {"object": "list", "data": [_with_progress(RunView(**r.model_dump())) for r in found]}


@router.get("/runs/{run_id}")
async def get_run(run_id: RowId, _: OpsKey, services: ServicesDep) -> RunView:
    """One run with its progress, ETA, latest metrics and error text."""
    return await _view(services, run_id)


@router.post("/runs/{run_id}/cancel")
async def cancel_run(run_id: RowId, _: OpsKey, services: ServicesDep) -> RunView:
    """Cancel a queued run; ask a running one to stop at its next step."""
    cancelled = await asyncio.to_thread(runs.cancel, services.conninfo, run_id)
    if cancelled is None:
        found = await asyncio.to_thread(runs.get, services.conninfo, run_id)
        if found is None:
            raise _unknown(run_id)
        raise Conflict(f"Run {run_id} is already {found.status}.", code="run_finished")
    job_id = cancelled.params.get("job_id")
    if job_id is not None:  # a job already picked up just finds its run cancelled
        await services.jobs.job_manager.cancel_job_by_id_async(job_id)
    return await _view(services, run_id)


def _check_pairs(
    conninfo: str, services: Services, config: TrainConfig, snapshot_id: int | None
) -> None:
    if snapshot_id is not None:
        with psycopg.connect(conninfo) as conn:
            snapshot = snapshots.get(conn, snapshot_id)
        if snapshot is None:
            raise NotFound(
                f"No snapshot with id {snapshot_id}.",
                param="snapshot_id",
                code="snapshot_not_found",
            )
        train = int(snapshot.counts["splits"].get("train", 0))
    else:
        train = preview(conninfo, services.settings.pairs).splits.get("train", 0)
    if train < config.min_pairs:
        raise InvalidRequest(
            f"Too few pairs to train on: {train} in the train split, {config.min_pairs} needed.",
            param="min_pairs",
            code="too_few_pairs",
        )


async def _view(services: Services, run_id: int) -> RunView:
    found = await asyncio.to_thread(runs.get, services.conninfo, run_id)
    if found is None:
        raise _unknown(run_id)
    metrics = await asyncio.to_thread(runs.latest_metrics, services.conninfo, run_id)
    return _with_progress(RunView(**found.model_dump(), metrics=metrics))


def _with_progress(view: RunView) -> RunView:
    if view.total_steps and view.started_at and view.step:
        view.progress = view.step / view.total_steps
        if view.status == "running":
            elapsed = (datetime.now(UTC) - view.started_at).total_seconds()
            view.eta_s = round(elapsed / view.step * (view.total_steps - view.step), 1)
    return view


def _unknown(run_id: int) -> NotFound:
    return NotFound(f"No run with id {run_id}.", param="run_id", code="run_not_found")
