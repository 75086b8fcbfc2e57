"""`ratchet worker`: the job worker that runs trainings, evaluations and the schedule.

Composition, not logic: it registers the trainer's and the evaluator's work as
procrastinate tasks. Tasks are made per app (`make_app`) so that they close over the
settings built at start-up; nothing is registered at import time. Any number of
workers on any number of machines share the queue; the `runs` and `evaluations`
tables' unique indexes, not job locks, keep one training (and one evaluation per
adapter) at a time.
"""

import asyncio
import logging
import uuid
from typing import Annotated

import psycopg
import typer
from procrastinate import App, Blueprint, PsycopgConnector

from ratchet import evaluations, jobs
from ratchet.cli_support import err, load_settings, migrated_database
from ratchet.settings import Settings

log = logging.getLogger(__name__)
# How often each worker looks for stalled jobs and rows queued without a job.
SWEEP_CRON = "*/5 * * * *"


def make_app(settings: Settings, conninfo: str) -> App:
    from trainer.jobs import execute_queued, nightly

    blueprint = Blueprint()

    @blueprint.task(name="train", queue=jobs.QUEUE)
    def train(run_id: int) -> None:
        execute_queued(settings, conninfo, run_id)

    @blueprint.task(name="evaluate", queue=jobs.QUEUE)
    async def evaluate(adapter_id: str, evaluation_id: int | None = None) -> None:
        await run_evaluation(settings, conninfo, adapter_id, evaluation_id)

    @blueprint.periodic(cron=settings.train_cron, periodic_id="nightly")
    @blueprint.task(name="nightly", queue=jobs.QUEUE)
    def nightly_job(timestamp: int) -> None:
        nightly(settings, conninfo)

    @blueprint.periodic(cron=SWEEP_CRON, periodic_id="sweep")
    @blueprint.task(name="sweep", queue=jobs.QUEUE)
    async def sweep_job(timestamp: int) -> None:
        await sweep(app, settings, conninfo)

    app = App(
        connector=PsycopgConnector(conninfo=conninfo),
        worker_defaults={"update_heartbeat_interval": 10, "stalled_worker_timeout": 30},
    )
    app.add_tasks_from(blueprint, namespace="ratchet")
    return app


async def run_evaluation(
    settings: Settings, conninfo: str, adapter_id: str, evaluation_id: int | None
) -> None:
    """The gate on one candidate. Jobs queued by older versions came without a row."""
    from eval.errors import EvalError
    from eval.run import evaluate

    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        if evaluation_id is None:
            try:
                created = await evaluations.create(conn, uuid.UUID(adapter_id), "training")
            except evaluations.EvaluationBusy as exc:
                log.info("adapter %s: %s", adapter_id, exc)
                return
            evaluation_id = created.id
        try:
            await evaluate(settings, conn, evaluation_id)
        except EvalError as exc:  # recorded on the evaluation already
            log.warning("evaluation %s failed: %s", evaluation_id, exc)


async def release_stalled(app: App, stale_after_s: float) -> int:
    """Jobs left `doing` by a killed worker would stay so forever: retry them (the task
    then finds its run failed by recovery and does nothing). Returns how many."""
    stalled = list(await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stale_after_s))
    for job in stalled:
        await app.job_manager.retry_job(job)
    return len(stalled)


async def sweep(app: App, settings: Settings, conninfo: str, grace_s: float = 30.0) -> str:
    """Fail what dead workers left running, release their jobs, and queue again the
    rows whose job never made it into the queue. Returns what it did, for the log."""
    from trainer.run import recover

    failed = await asyncio.to_thread(recover, settings, conninfo)
    released = await release_stalled(app, settings.run_stale_after_s)
    orphans = await jobs.requeue_orphans(app, conninfo, grace_s)
    done = (
        f"abandoned runs failed: {failed}; stalled jobs released: {released}; "
        f"queued again: evaluations {orphans.evaluations}, runs {orphans.runs}"
    )
    if failed or released or orphans.evaluations or orphans.runs:
        log.warning(done)
    return done


def worker(
    once: Annotated[bool, typer.Option(help="Run what is queued, then exit.")] = False,
) -> None:
    """Run trainings and evaluations from the Postgres queue (and the nightly schedule)."""
    settings = load_settings()
    with migrated_database(settings) as url:
        app = make_app(settings, url)

        async def work() -> None:
            async with app.open_async():
                err.print(await sweep(app, settings, url))
                await app.run_worker_async(queues=[jobs.QUEUE], wait=not once)

        asyncio.run(work())
