"""The job queue as every process sees it: task names, and queueing a row's job.

The gateway and a training defer jobs by name (the worker holds the task code). A
job's row (`runs`, `evaluations`) is always committed *before* its job is deferred,
so a worker never starts a job whose row it cannot see yet. If the process dies
between the two, the row is `queued` without a job: `requeue_orphans`, run by every
worker at start-up and every few minutes, finds such rows and defers them again.
A job deferred twice for one row is harmless: the task claims its row atomically.
"""

import logging
import uuid
from dataclasses import dataclass

import psycopg
from procrastinate import App, PsycopgConnector

from ratchet import evaluations

log = logging.getLogger(__name__)

QUEUE = "training"
TRAIN_TASK = "ratchet:train"
EVALUATE_TASK = "ratchet:evaluate"
_LIVE = ("todo", "doing")


def deferring_app() -> App:
    return App(connector=PsycopgConnector())


async def defer_evaluation(app: App, evaluation_id: int, adapter_id: uuid.UUID) -> int:
    job_id: int = await app.configure_task(EVALUATE_TASK, queue=QUEUE).defer_async(
        adapter_id=str(adapter_id), evaluation_id=evaluation_id
    )
    return job_id


async def defer_training(app: App, run_id: int) -> int:
    job_id: int = await app.configure_task(TRAIN_TASK, queue=QUEUE).defer_async(run_id=run_id)
    return job_id


async def queue_evaluation(conninfo: str, adapter_id: uuid.UUID, requested_by: str) -> int:
    """Create an evaluation row (committed), then defer its job; return the row's id.
    EvaluationBusy when one is queued or running already. If the job cannot be
    deferred the row stays queued, and the next worker's sweep defers it."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        evaluation = await evaluations.create(conn, adapter_id, requested_by)
    app = App(connector=PsycopgConnector(conninfo=conninfo))
    try:
        async with app.open_async():
            await defer_evaluation(app, evaluation.id, adapter_id)
    except Exception as exc:
        log.warning("evaluation %s is queued without its job for now: %s", evaluation.id, exc)
    return evaluation.id


@dataclass
class Orphans:
    """Queued rows found without a live job, and deferred again."""

    evaluations: list[int]
    runs: list[int]


async def requeue_orphans(app: App, conninfo: str, grace_s: float = 30.0) -> Orphans:
    """Defer a job again for every row queued over `grace_s` ago with no live job (its
    process died between committing the row and deferring the job)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        found_evals = await (
            await conn.execute(
                "SELECT e.id, e.adapter_id FROM evaluations e WHERE e.status = 'queued'"
                " AND e.created_at < now() - make_interval(secs => %s) AND NOT EXISTS ("
                "  SELECT 1 FROM procrastinate_jobs j WHERE j.task_name = %s"
                "  AND j.status = ANY(%s::procrastinate_job_status[])"
                "  AND j.args->>'evaluation_id' = e.id::text)",
                (grace_s, EVALUATE_TASK, list(_LIVE)),
            )
        ).fetchall()
        found_runs = await (
            await conn.execute(
                "SELECT r.id FROM runs r WHERE r.status = 'queued'"
                " AND r.created_at < now() - make_interval(secs => %s) AND NOT EXISTS ("
                "  SELECT 1 FROM procrastinate_jobs j WHERE j.task_name = %s"
                "  AND j.status = ANY(%s::procrastinate_job_status[])"
                "  AND j.args->>'run_id' = r.id::text)",
                (grace_s, TRAIN_TASK, list(_LIVE)),
            )
        ).fetchall()
    for evaluation_id, adapter_id in found_evals:
        log.warning("evaluation %s was queued without a job; queueing it again", evaluation_id)
        await defer_evaluation(app, int(evaluation_id), adapter_id)
    for (run_id,) in found_runs:
        log.warning("run %s was queued without a job; queueing it again", run_id)
        await defer_training(app, int(run_id))
    return Orphans([int(r[0]) for r in found_evals], [int(r[0]) for r in found_runs])
